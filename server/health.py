"""The standard gRPC health service (`grpc.health.v1.Health`), with `List` as well as Check and Watch."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    """grpcio's asyncio health servicer, plus `List` (the status of every service it knows), which
    grpcio's own leaves unimplemented (a call then fails with a server-side traceback)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service this server reports on ("" is the whole server), with its status."""
        response = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response
