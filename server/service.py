"""The gRPC service: the only server module that knows protobuf.

Each RPC converts the request to plain values (`messages`), calls the
scheduler, and converts the result back. A `ServeError` becomes a gRPC status
with its message; the request that raised it changed no state. In a
StepSessions request, each entry's ServeError becomes that entry's StepError.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import numpy as np

from lstmserve.metadata import ModelSpec
from lstmserve.server import messages
from lstmserve.server.auth import bearer_key, owner_of
from lstmserve.server.columns import EMPTY_SESSION_ID, ColumnsStep, decode_columns, fill_columns_result, first_repeat
from lstmserve.server.config import ServerConfig
from lstmserve.server.errors import (
    InvalidInput,
    NotSteppable,
    ServeError,
    SessionMoved,
)
from lstmserve.server.generation import GeneratedToken, GenerateParams, TokenChunk, generate
from lstmserve.server.handoff import Cluster, check_lease
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner
from lstmserve.server.sampling import Sampler
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.session_ops import new_session
from lstmserve.server.snapshot import decode_snapshot, encode_snapshot
from lstmserve.server.sessions import Session, StepResult, check_proposed_id
from lstmserve.server.state import SessionState
from lstmserve.server.status import refusals, refuse, status_for
from lstmserve.server.text import shown
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

class LstmServeService(pb_grpc.LstmServeServicer):
    """Implements `lstmserve.v1.LstmServe` on top of the scheduler (and, with several replicas, the cluster)."""

    def __init__(
        self, scheduler: Scheduler, runner: Runner, config: ServerConfig, metrics: Metrics, *, cluster: Cluster | None = None
    ) -> None:
        self.scheduler = scheduler
        self.cluster = cluster
        self.runner = runner
        self.spec: ModelSpec = runner.spec
        self.config = config
        self.metrics = metrics
        self.requests_in_progress = 0  # step requests (and generations) not answered yet; drain waits for 0
        self._generate_limits = messages.GenerateLimits(
            max_tokens=config.max_generate_tokens,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
        )

    # ---- helpers ---------------------------------------------------------
    def _refuse(self, context: grpc.aio.ServicerContext, error: ServeError) -> None:
        refuse(context, error, self.metrics)

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """Who the caller is: a digest of its API key ("" without keys). Sessions belong to their creator."""
        if not self.config.api_keys:
            return ""
        return owner_of(bearer_key(context.invocation_metadata()))

    def _session_info(self, session: Session, step: int | None = None) -> pb.SessionInfo:
        """The session as it is now, or at `step` (what an operation left, steps queued behind it aside)."""
        idle = time.monotonic() - session.last_used
        return pb.SessionInfo(
            session_id=session.id,
            step=session.step if step is None else step,
            idle_s=idle,
            expires_in_s=max(0.0, self.config.session_ttl_s - idle),
        )

    def _check_lease(self, session_id: str) -> None:
        check_lease(self.cluster, session_id)

    def _require_steppable(self) -> None:
        if not self.spec.steppable:
            raise NotSteppable("this model is bidirectional and cannot be stepped; use Infer for whole sequences")

    # ---- unary RPCs ------------------------------------------------------
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        spec, config = self.spec, self.config
        return pb.ModelInfo(
            kind=spec.kind,
            vocabulary=list(spec.vocabulary),
            input_size=spec.input_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_directions=spec.num_directions,
            proj_size=spec.proj_size,
            output_size=spec.output_size,
            steppable=spec.steppable,
            provider=self.runner.provider,
            fingerprint=spec.fingerprint,
            head=spec.head,
            max_tokens_per_request=config.max_tokens_per_request,
            max_generate_tokens=config.max_generate_tokens,
            session_ttl_s=config.session_ttl_s,
            max_sessions=config.max_sessions,
            cell=spec.cell,
            classes=list(spec.classes),
            state_tensors=len(spec.states),
            max_sessions_per_request=config.max_sessions_per_request,
        )

    @refusals(pb.SessionInfo)
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        self._require_steppable()
        session = await self._new_session(self._owner(context), request.session_id)
        return self._session_info(session)

    @refusals(pb.SessionInfo)
    async def GetSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        self._check_lease(request.session_id)
        session = await self.scheduler.find_session(request.session_id, self._owner(context))
        self._check_lease(session.id)
        return self._session_info(session)

    @refusals(pb.SessionInfo)
    async def ResetSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        self._check_lease(request.session_id)
        session = await self.scheduler.reset_session(request.session_id, self._owner(context))
        self._check_lease(session.id)
        # Step 0, as the reset left it: a generation running on the session may have stepped it since.
        return self._session_info(session, step=0)

    @refusals(pb.CloseSessionResponse)
    async def CloseSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        self._check_lease(request.session_id)
        await self.scheduler.close_session(request.session_id, self._owner(context))
        return pb.CloseSessionResponse()

    @refusals(pb.SessionSnapshot)
    async def SnapshotSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.SessionSnapshot:
        self._check_lease(request.session_id)
        step, state = await self.scheduler.read_state(request.session_id, self._owner(context))
        self._check_lease(request.session_id)
        blob = encode_snapshot(state, step, self.spec.fingerprint, self.config.snapshot_secret)
        return pb.SessionSnapshot(blob=blob, step=step)

    @refusals(pb.SessionInfo)
    async def RestoreSession(self, request: pb.RestoreSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        spec = self.spec
        self._require_steppable()
        state, step = decode_snapshot(
            request.blob,
            fingerprint=spec.fingerprint,
            shape=spec.state_shape,
            secret=self.config.snapshot_secret,
        )
        session = await self._new_session(self._owner(context), request.session_id, (state, step))
        return self._session_info(session)

    @refusals(pb.InferResponse)
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        inputs = messages.decode_inputs(
            request.tokens, request.features, request.HasField("features"), self.spec, self.config.max_tokens_per_request
        )
        self._check_response_size(messages.step_output_bytes(len(inputs), pb.OUTPUT_LOGITS, 0, self.spec.output_size), "Infer")
        logits = await asyncio.to_thread(self.runner.run_stateless, inputs[np.newaxis])
        return pb.InferResponse(logits=messages.encode_tensor(logits[0]))

    # ---- the stepping stream ---------------------------------------------
    async def Step(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        session: Session | None = None
        owner = self._owner(context)
        async for request in request_iterator:
            self.requests_in_progress += 1
            try:
                self._require_steppable()
                parsed = self._parse(request, first=session is None)  # validate before any state changes
                if session is None:
                    session = await self._open(request.session_id, owner)
                elif request.session_id and request.session_id != session.id:
                    raise InvalidInput(
                        f"session_id {shown(request.session_id)} differs from this stream's session {session.id!r}"
                    )
                elif session not in self.scheduler.sessions:
                    if session.moved:  # handed over to another replica: a new stream reaches it
                        raise SessionMoved(f"session {session.id!r} moved to another replica; retry")
                    # Spilled while this stream idled: brought back (NOT_FOUND if it was closed or expired).
                    session = await self.scheduler.find_session(session.id, owner)
                self._check_lease(session.id)
                if parsed.inputs is None:  # an opening request without input: report the session
                    yield pb.StepResponse(session_id=session.id, request_id=request.request_id, step=session.step)
                elif parsed.generate is not None:
                    async for response in self._generate(session, request, parsed):
                        yield response
                else:
                    yield await self._step(session, request, parsed)
            except ServeError as error:
                self._refuse(context, error)
                return  # the stream ends with the status; the session is intact
            finally:
                self.requests_in_progress -= 1

    # ---- many sessions in one request -------------------------------------
    @refusals(pb.StepSessionsResponse)
    async def StepSessions(
        self, request: pb.StepSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepSessionsResponse:
        """One step for each entry's session, all started at once so that they share batches. The request
        as a whole is refused (nothing applied) only for its shape: no entries, too many, a session twice,
        more output than a message may carry. Every other refusal is its entry's StepError."""
        self._require_steppable()
        owner = self._owner(context)
        if request.HasField("columns"):
            if request.steps:
                raise InvalidInput("the StepSessions request carries both steps and columns: send one of them")
            config = self.config
            step = decode_columns(
                request.columns,
                self.spec,
                max_sessions=config.max_sessions_per_request,
                max_message_bytes=config.max_message_bytes,
            )
            self.requests_in_progress += 1
            try:
                return await self._step_columns(step, owner)
            finally:
                self.requests_in_progress -= 1
        self._check_entries(request.steps)
        # Every entry is parsed before any is stepped: a bad one is refused before the others start.
        entries = self._parse_entries(request.steps)
        self._check_output_size(entries)
        self.requests_in_progress += 1
        try:
            return await self._step_entries(entries, owner)
        finally:
            self.requests_in_progress -= 1

    def _check_entries(self, steps: Sequence[pb.SessionStep]) -> None:
        """INVALID_ARGUMENT for a request with no entries, more than --max-sessions-per-request, or a session twice."""
        limit = self.config.max_sessions_per_request
        if not steps:
            raise InvalidInput("StepSessions request has no steps")
        if len(steps) > limit:
            raise InvalidInput(f"request carries {len(steps)} steps, more than --max-sessions-per-request={limit}")
        repeat = first_repeat([message.session_id for message in steps])  # an empty id is refused on its own
        if repeat is not None:
            earlier, index = repeat
            raise InvalidInput(
                f"steps[{index}].session_id {shown(steps[index].session_id)} repeats steps[{earlier}]: "
                "a StepSessions request steps each session at most once"
            )

    def _parse_entries(self, steps: Sequence[pb.SessionStep]) -> list[_Entry]:
        """Every entry with its validated step or the reason it is refused. The tokens of all the entries are
        converted and checked at once when they are all valid (else entry by entry, to name the bad one)."""
        if self.spec.kind != "tokens" or any(message.HasField("features") for message in steps):
            return [self._parse_entry(index, message) for index, message in enumerate(steps)]
        limit = self.config.max_tokens_per_request
        inputs = messages.decode_token_batches([message.tokens for message in steps], self.spec, limit)
        if inputs is None:
            return [self._parse_entry(index, message) for index, message in enumerate(steps)]
        return [self._parse_entry(index, message, tokens) for index, (message, tokens) in enumerate(zip(steps, inputs))]

    def _parse_entry(self, index: int, message: pb.SessionStep, tokens: np.ndarray | None = None) -> _Entry:
        """An entry with its validated step, or with the reason it is refused."""
        try:
            if not message.session_id:
                raise InvalidInput(EMPTY_SESSION_ID)
            return _Entry(index, message, self._parse_step(message, tokens))
        except ServeError as error:
            return _Entry(index, message, error)

    def _check_output_size(self, entries: list[_Entry]) -> None:
        """INVALID_ARGUMENT if the output the entries ask for cannot fit in one response message."""
        size = 0
        for entry in entries:
            if isinstance(entry.outcome, _ParsedStep) and entry.outcome.inputs is not None:
                positions, message = len(entry.outcome.inputs), entry.message
                size += messages.step_output_bytes(positions, message.output, message.top_k, self.spec.output_size)
        limit = self.config.max_message_bytes
        if size > limit:
            raise InvalidInput(
                f"the steps ask for about {size} bytes of output, more than --max-message-bytes={limit}: "
                "send fewer sessions or positions per request, or ask for less output (OUTPUT_TOPK with a smaller top_k, or OUTPUT_NONE)"
            )

    async def _step_entries(self, entries: list[_Entry], owner: str) -> pb.StepSessionsResponse:
        """Every entry stepped as Step steps a request, all queued at once (`_step_each`): each entry's result,
        or its refusal as a StepError, in order. The answers are written in place into the response (a message
        built apart and then added would be copied)."""
        refusals: dict[int, ServeError] = {}
        steps: list[tuple[int, str, np.ndarray, int | None]] = []
        for entry in entries:
            if isinstance(entry.outcome, ServeError):
                refusals[entry.index] = entry.outcome
            else:
                assert entry.outcome.inputs is not None
                steps.append((entry.index, entry.message.session_id, entry.outcome.inputs, entry.outcome.expected_step))
        answers = await self._step_each(steps, owner, refusals)
        response = pb.StepSessionsResponse()
        for entry in entries:
            result = response.results.add()
            answer = answers.get(entry.index)
            if answer is None:
                self._entry_refused(result.error, entry, refusals[entry.index])
            else:
                _fill_step_response(result.response, answer[0], entry.message, entry.outcome, answer[1])  # type: ignore[arg-type]
        return response

    def _live_entry_session(self, session_id: str, owner: str) -> Session | None:
        """The live session of one entry (or row) of a StepSessions request when it is in memory, the common
        case, found without a coroutine; None when `Scheduler.find_session` must look further (or refuse)."""
        self._check_lease(session_id)
        live = self.scheduler.sessions.find(session_id)
        return live if live is not None and live.owner == owner else None

    async def _step_each(
        self, steps: list[tuple[int, str, np.ndarray, int | None]], owner: str, refusals: dict[int, ServeError]
    ) -> dict[int, tuple[Session, StepResult]]:
        """Steps each (position, session id, inputs, expected step) of a StepSessions request, all queued at once
        (`Scheduler.step_many`): returns the answered positions' sessions and results; a position refused (its
        session not found or not the caller's, its step refused) goes into `refusals` instead."""
        stepped: list[int] = []
        sessions: list[tuple[Session, np.ndarray, int | None]] = []
        for position, session_id, inputs, expected_step in steps:
            try:
                session = self._live_entry_session(session_id, owner) or await self.scheduler.find_session(
                    session_id, owner
                )
            except ServeError as error:
                refusals[position] = error
                continue
            stepped.append(position)
            sessions.append((session, inputs, expected_step))
        outcomes = await self.scheduler.step_many(sessions)
        answers: dict[int, tuple[Session, StepResult]] = {}
        for position, (session, _, _), outcome in zip(stepped, sessions, outcomes, strict=True):
            try:
                if isinstance(outcome, ServeError):
                    raise outcome
                self._check_lease(session.id)  # acknowledged only while no other replica can have taken the session
                answers[position] = (session, outcome)
            except ServeError as error:
                refusals[position] = error
        return answers

    def _entry_refused(self, refusal: pb.StepError, entry: _Entry, error: ServeError) -> None:
        """Writes an entry's refusal as its StepError."""
        self._write_refusal(refusal, entry.index, entry.message.session_id, f"steps[{entry.index}]", error)

    def _write_refusal(self, refusal: pb.StepError, index: int, session_id: str, where: str, error: ServeError) -> None:
        """Writes one entry's (or row's) refusal, counted in the error metrics like a refused call."""
        code = status_for(error)
        self.metrics.errors.labels(code=code.name).inc()
        refusal.session_id = session_id
        refusal.index = index
        refusal.code = code.value[0]
        refusal.message = f"{where}: {error}"

    async def _step_columns(self, step: ColumnsStep, owner: str) -> pb.StepSessionsResponse:
        """Every row stepped as an entry of the steps form is (`_step_each`, the same exactly-once rules), answered
        in columns: the answered rows' counters and outputs, and each refused row's StepError."""
        refusals: dict[int, ServeError] = dict(step.refused)
        expected_steps = step.expected_steps
        steps = [
            (row, session_id, step.inputs[row], expected_steps[row] if expected_steps is not None else None)
            for row, session_id in enumerate(step.session_ids)
            if row not in refusals
        ]
        answers = {row: result for row, (_, result) in (await self._step_each(steps, owner, refusals)).items()}
        response = pb.StepSessionsResponse()
        result = response.columns
        fill_columns_result(result, step, answers, self.spec.output_size)
        for row in sorted(refusals):
            self._write_refusal(result.errors.add(), row, step.session_ids[row], f"session_ids[{row}]", refusals[row])
        return response

    async def _open(self, session_id: str, owner: str) -> Session:
        if session_id:
            return await self.scheduler.find_session(session_id, owner)
        return await self._new_session(owner, "")

    async def _new_session(
        self, owner: str, proposed_id: str, restored: tuple[SessionState, int] | None = None
    ) -> Session:
        """A new session under the client's proposed id (checked first) or a fresh one (see `new_session`)."""
        session_id = check_proposed_id(proposed_id) if proposed_id else None
        return await new_session(self.scheduler, self.cluster, owner, session_id, restored)

    def _parse(self, request: pb.StepRequest, *, first: bool) -> _ParsedStep:
        has_input = bool(request.tokens) or request.HasField("features")
        generate_params = None
        if request.HasField("generate"):
            generate_params = messages.decode_generate(request.generate, self.spec, self._generate_limits)
        elif not has_input and first:
            return _ParsedStep(inputs=None)
        parsed = self._parse_step(request, generate_params=generate_params)
        if generate_params is None and parsed.inputs is not None:  # a generation answers a token at a time
            size = messages.step_output_bytes(len(parsed.inputs), request.output, request.top_k, self.spec.output_size)
            self._check_response_size(size, "the step")
        return parsed

    def _check_response_size(self, size: int, what: str) -> None:
        """INVALID_ARGUMENT, before any state changes, if an answer of about `size` bytes could not be sent: gRPC
        would refuse to send it after the step was applied, and a resend would meet the same refusal."""
        limit = self.config.max_message_bytes
        if size > limit:
            raise InvalidInput(
                f"{what} asks for about {size} bytes of output, more than --max-message-bytes={limit}: "
                "send fewer positions per request, or ask for less output (OUTPUT_TOPK with a smaller top_k, or OUTPUT_NONE)"
            )

    def _parse_step(
        self,
        request: pb.StepRequest | pb.SessionStep,
        tokens: np.ndarray | None = None,
        generate_params: GenerateParams | None = None,
    ) -> _ParsedStep:
        """The input, output and expected step of one step (the fields StepRequest and SessionStep share);
        `tokens`: its tokens, already decoded and checked; `generate_params`: its generation's parameters, already
        decoded."""
        messages.validate_output(request.output, request.top_k, self.spec)
        if tokens is not None:
            inputs = tokens
        else:
            inputs = messages.decode_inputs(
                request.tokens,
                request.features,
                request.HasField("features"),
                self.spec,
                self.config.max_tokens_per_request,
            )
        sampler = Sampler(messages.decode_sampling(request.sampling, self.spec)) if request.output == pb.OUTPUT_SAMPLE else None
        expected = request.expected_step if request.HasField("expected_step") else None
        return _ParsedStep(inputs=inputs, generate=generate_params, sampler=sampler, expected_step=expected)

    async def _step(
        self, session: Session, request: pb.StepRequest | pb.SessionStep, parsed: _ParsedStep
    ) -> pb.StepResponse:
        assert parsed.inputs is not None
        result = await self.scheduler.step(session, parsed.inputs, parsed.expected_step)
        self._check_lease(session.id)  # acknowledged only while no other replica can have taken the session
        return self._step_response(session, request, parsed, result)

    @staticmethod
    def _step_response(
        session: Session, request: pb.StepRequest | pb.SessionStep, parsed: _ParsedStep, result: StepResult
    ) -> pb.StepResponse:
        """The answer to a step: the session's new step counter and the outputs the request asked for."""
        response = pb.StepResponse()
        _fill_step_response(response, session, request, parsed, result)
        return response

    async def _generate(
        self, session: Session, request: pb.StepRequest, parsed: _ParsedStep
    ) -> AsyncIterator[pb.StepResponse]:
        assert parsed.inputs is not None and parsed.generate is not None
        count = 0
        coalesce = parsed.generate.coalesce
        chunks = generate(
            self.scheduler, session, parsed.inputs, parsed.generate, self.spec.vocabulary, parsed.expected_step
        )
        async with aclosing(chunks):  # a client that goes away stops the generation at once
            async for chunk in chunks:
                self._check_lease(session.id)  # a lapse ends the generation: its stream answers UNAVAILABLE
                count += len(chunk.tokens)
                if coalesce:  # everything made since the last response, in one message
                    yield self._coalesced_response(session, request, chunk)
                    continue
                for event in chunk:
                    yield self._token_response(session, request, event)
        self.metrics.generated_tokens.inc(count)

    @staticmethod
    def _coalesced_response(session: Session, request: pb.StepRequest, chunk: TokenChunk) -> pb.StepResponse:
        """One response for all the tokens of a chunk, and its finish, if the chunk is the generation's last."""
        last = chunk[-1]
        response = pb.StepResponse(
            session_id=session.id, request_id=request.request_id, step=last.step, batch_size=last.batch_size
        )
        if chunk.finish is not None:
            response.finished = True
            response.finish_reason = chunk.finish.finish_reason
        response.tokens.extend(chunk.tokens)
        response.texts.extend(chunk.texts)
        return response

    @staticmethod
    def _token_response(session: Session, request: pb.StepRequest, event: GeneratedToken) -> pb.StepResponse:
        """One response for one generated token, or for the generation's finish (token -1)."""
        response = pb.StepResponse(
            session_id=session.id, request_id=request.request_id, step=event.step, batch_size=event.batch_size
        )
        if event.finish_reason:
            response.finished = True
            response.finish_reason = event.finish_reason
        else:
            response.token = event.token
            response.text = event.text
        return response


def _fill_step_response(
    response: pb.StepResponse,
    session: Session,
    request: pb.StepRequest | pb.SessionStep,
    parsed: _ParsedStep,
    result: StepResult,
) -> None:
    """Writes the answer to a step into `response`: the session's new step counter and the outputs asked for."""
    response.session_id = session.id
    response.request_id = request.request_id
    response.step = result.step
    response.batch_size = result.batch_size
    sampled = parsed.sampler.sample(result.logits[-1]) if parsed.sampler is not None else None
    messages.step_outputs(response, result.logits, request.output, request.top_k, sampled)


@dataclass(frozen=True, slots=True)
class _ParsedStep:
    """A validated StepRequest: its input (None for an opening request) and what to do with it."""

    inputs: np.ndarray | None
    generate: GenerateParams | None = None
    sampler: Sampler | None = None
    expected_step: int | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One entry of a StepSessions request: its position, its message, and its parsed step or why it is refused."""

    index: int
    message: pb.SessionStep
    outcome: _ParsedStep | ServeError
