"""The transport ceiling: a minimal gRPC server that answers `Step` with same-sized messages and no model.

It speaks `lstmserve.v1.LstmServe.Step`, `CreateSession` and `CloseSession` (everything else is UNIMPLEMENTED), so the
benchmark drives it with the same load generator and the same message sizes:
logits of [positions, output_size] float32, top-k rows, or a sampled token; for generation
requests one response per token, or with `coalesce` as many responses as the server sends, as
full (the first token alone, then shares of `coalesce_share` of the streams open).

    python -m lstmserve.bench.echo --port 0 --output-size 98
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from lstmserve.server.token_log import coalesce_share
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


class EchoService(pb_grpc.LstmServeServicer):
    """Answers each step like the real server would, in shape only."""

    def __init__(self, output_size: int) -> None:
        self.output_size = output_size
        self._zeros: dict[int, bytes] = {}
        # Step streams open, which size coalesced responses. Not the generations being answered: the echo answers
        # at once, so most of its streams wait for their next request at any moment, while the server's, computing,
        # are nearly all generating (counted that way, the echo sent more, smaller messages than the server).
        self._streams = 0

    def _coalesced(self, max_tokens: int, step: int) -> list[pb.StepResponse]:
        """A coalescing generation's responses, as many and as full as the server's would be with a generation on
        every open stream: the first token alone, then shares of `coalesce_share(streams)` tokens, the finish with
        the last share. (max_tokens 0, which the server refuses and the load generator never sends, gets the finish
        alone.)"""
        share = coalesce_share(self._streams)
        sizes = [1] if max_tokens else []
        while sum(sizes) < max_tokens:
            sizes.append(min(share, max_tokens - sum(sizes)))
        responses = []
        for size in sizes:
            step += size
            responses.append(
                pb.StepResponse(session_id="0" * 32, step=step, tokens=[1] * size, texts=["a"] * size, batch_size=1)
            )
        if not responses:
            responses.append(pb.StepResponse(session_id="0" * 32, step=step))
        responses[-1].finished, responses[-1].finish_reason = True, "length"
        return responses

    def _logits(self, positions: int) -> pb.Tensor:
        data = self._zeros.get(positions)
        if data is None:
            data = self._zeros[positions] = bytes(4 * positions * self.output_size)
        return pb.Tensor(shape=[positions, self.output_size], data=data)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        """The load generator opens each session as the client library does (its proposed id, nothing kept)."""
        return pb.SessionInfo(session_id=request.session_id)

    async def CloseSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        """The load generator closes each session after its run; there is nothing to free."""
        return pb.CloseSessionResponse()

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        self._streams += 1
        try:
            step = 0
            async for request in request_iterator:
                step += len(request.tokens)
                if request.HasField("generate"):
                    if request.generate.coalesce:
                        for response in self._coalesced(request.generate.max_tokens, step):
                            yield response
                        step += request.generate.max_tokens
                        continue
                    for _ in range(request.generate.max_tokens):
                        step += 1
                        yield pb.StepResponse(session_id="0" * 32, step=step, token=1, text="a", batch_size=1)
                    yield pb.StepResponse(session_id="0" * 32, step=step, finished=True, finish_reason="length")
                    continue
                yield self._step_response(request, step)
        finally:
            self._streams -= 1

    def _step_response(self, request: pb.StepRequest, step: int) -> pb.StepResponse:
        """The answer to a plain step, with the outputs the request asks for, in shape."""
        response = pb.StepResponse(session_id="0" * 32, request_id=request.request_id, step=step, batch_size=1)
        if request.output in (pb.OUTPUT_UNSPECIFIED, pb.OUTPUT_LOGITS):
            response.logits.CopyFrom(self._logits(len(request.tokens)))
        elif request.output == pb.OUTPUT_TOPK:
            k = request.top_k or 5
            for _ in request.tokens:
                response.topk.add(ids=list(range(k)), logprobs=[0.0] * k)
        elif request.output == pb.OUTPUT_SAMPLE:
            response.token = 1
        return response


async def serve(host: str, port: int, output_size: int) -> None:
    """Serves the echo service until cancelled; prints the bound address."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LstmServeServicer_to_server(EchoService(output_size), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo: serving on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Command line of the echo server."""
    parser = argparse.ArgumentParser(description="lstmserve transport-ceiling echo server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--output-size", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.output_size))


if __name__ == "__main__":
    main()
