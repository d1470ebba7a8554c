"""The generation loop of one session: the prompt in n_batch pieces, then one token a step, streamed.

The coordinator owns the tokenizer: it turns the prompt (or a conversation, with the model's chat
template) into tokens, and each sampled token into text, holding back what may be the start of a stop
string. Every step goes through `advance`, which carries the session over to live nodes when one fails
(recovery.py) or leaves (migration.py) and runs the step again: the client's stream neither repeats
nor skips a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
import uuid
from typing import Callable, Iterator

from .. import messages as m
from ..engine import Tokenizer
from ..errors import BadInputError, CapacityError, PeerError
from ..textstream import TextStream, check_stops
from .measuring import Measurer
from .members import Membership
from .migration import Migration
from .planning import Placement
from .recovery import Recovery
from .sessions import Session, Sessions
from .stepping import Stepper, add_timings
from .succession import RecoveryLog

MAX_RECOVERIES_PER_STEP = 3
MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 1024


class Generation:
    """Runs sessions, each on the thread of the call that asked for it."""

    def __init__(self, tokenizer: Tokenizer, settings: m.ContextSettings, default_max_tokens: int,
                 placement: Placement, sessions: Sessions, stepper: Stepper, recovery: Recovery,
                 migration: Migration, log_: RecoveryLog, measurer: Measurer, members: Membership):
        self.tokenizer, self.settings, self.default_max_tokens = tokenizer, settings, default_max_tokens
        self._placement, self._sessions, self._stepper = placement, sessions, stepper
        self._recovery, self._migration, self._log = recovery, migration, log_
        self._measurer, self._members = measurer, members

    def generate(self, request: m.GenerateRequest, is_active: Callable[[], bool], wait_s: float = 120.0
                 ) -> Iterator[m.GenerateEvent]:
        """Run one session: prompt in n_batch pieces, then one token per step, streaming text pieces."""
        sampling = request.sampling
        if sampling.seed is None and not sampling.greedy:
            # Fixed here, so that a sampler rebuilt on another node after a failure draws the same tokens.
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        stops = check_stops(list(request.stop))  # counts before it copies
        tokens = self.prompt_tokens(request)
        n_ctx = self.settings.n_ctx
        if len(tokens) >= n_ctx:
            raise BadInputError(f"the prompt is {len(tokens)} tokens but a session holds {n_ctx}; shorten it or "
                                "start the coordinator with a larger --ctx")
        budget = min(request.max_tokens or self.default_max_tokens, n_ctx - len(tokens))
        deadline = time.monotonic() + wait_s
        with self._sessions.slot(wait_s, is_active):
            sid = uuid.uuid4().hex[:16]
            session = None
            try:
                session = self._placement.start_session(  # the planner sees the session as soon as it has a route
                    lambda route: self._sessions.add(Session(sid, route, sampling)),
                    max(0.0, deadline - time.monotonic()), is_active)
                yield from self._run(session, tokens, budget, stops, request.timings, is_active)
            finally:
                if session is not None:
                    self._stepper.close_everywhere(session)
                    self._sessions.remove(sid)
                    # What the session's steps said of its nodes: probe again, or plan with it.
                    todo = self._measurer.assess([h.node_id for h in session.route])
                    if todo == "probe":
                        self._placement.reprobe()
                    elif todo == "plan":
                        self._placement.recheck()

    def prompt_tokens(self, request: m.GenerateRequest) -> list[int]:
        if request.prompt is not None:
            if not request.prompt:
                raise BadInputError("the prompt is empty")
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise BadInputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
            return self.tokenizer.tokenize(request.prompt)
        if request.messages is not None:
            if len(request.messages) > MAX_MESSAGES:
                raise BadInputError(f"a conversation has at most {MAX_MESSAGES} messages")
            if not request.messages:
                raise BadInputError("a chat request needs at least one message")
            if sum(len(c) for _, c in request.messages) > MAX_PROMPT_CHARS:
                raise BadInputError(f"the conversation is longer than {MAX_PROMPT_CHARS} characters")
            return self.tokenizer.chat_tokens(list(request.messages))  # BOS as the template says (tokenizer.py)
        raise BadInputError("a generate request needs a prompt or chat messages")

    def _run(self, session: Session, tokens, budget, stops, want_timings, is_active):
        # A node lost just before the session started is carried over like one lost during a step.
        self.advance(session, [], 0, sample=False)
        yield m.Started(session.sid, len(tokens))
        t0 = time.perf_counter()
        result = None
        session.prompt_len = len(tokens)
        n_batch = self.settings.n_batch
        for i in range(0, len(tokens), n_batch):
            piece = tokens[i:i + n_batch]
            last_piece = i + n_batch >= len(tokens)
            if last_piece and self._stepper.failover_enabled:
                # Every remote hop checkpoints with the prompt's last piece: the prompt is the costliest part
                # to replay, and its checkpoint (the session's largest) is taken before the first token.
                session.ask_checkpoint(*(h.layers for h in session.route if not h.is_self))
            result = self.advance(session, piece, i, sample=last_piece)
        stream = TextStream(stops)
        totals = {k: 0.0 for k in ("compute_ms", "serialization_ms", "network_ms", "sampling_ms")} | {"steps": 0}
        first = last = None
        finish = "length"
        while True:
            token = result.token
            if self.tokenizer.is_eog(token):
                finish = "stop"
                break
            session.generated += 1
            text = stream.feed(self.tokenizer.piece(token))
            last = time.perf_counter()
            first = first or last
            event = m.Piece(text, (token,))
            if stream.stopped or session.generated >= budget or not is_active():
                finish = "stop" if stream.stopped else "length" if session.generated >= budget else "cancelled"
                yield event
                break
            if len(session.route) == 1 and session.route[0].is_self:  # nothing runs elsewhere meanwhile
                yield event
                result = self.advance(session, [token], session.positions, sample=True)
            else:  # the next step goes first: the client's stream sends this piece while other nodes compute
                result = yield from self.advance_sending(session, [token], session.positions, True, event)
            if want_timings:
                add_timings(totals, result, time.perf_counter() - last)
        tail = stream.flush()
        if tail:
            yield m.Piece(tail)
        n = session.generated
        if n >= 8 and last > first:
            self._placement.note_speed(session.route, (n - 1) / (last - first))
        yield m.Done(finish, len(tokens), n, 1e3 * ((first or time.perf_counter()) - t0),
                     (n - 1) / (last - first) if n > 1 and last > first else 0.0,
                     m.StepTimings(int(totals.pop("steps")), **totals))

    # ------------------------------------------------------------ one step, and surviving failures

    def advance(self, session: Session, tokens: list[int], start: int, sample: bool) -> m.StepResult:
        """Run one step of a session; when a node fails, carry the session over to a successor and retry."""
        steps = self.advance_sending(session, tokens, start, sample, None)
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        raise AssertionError("a step without an event to send yielded")

    def advance_sending(self, session: Session, tokens: list[int], start: int, sample: bool,
                        event: m.Piece | None):
        """`advance` as a generator that also yields `event` once, while the step is on its way through the
        remote hops (the client's stream sends it meanwhile), or before a recovery or an error; returns the
        step's result."""
        recovered = []
        failed, attempts = "", 0
        try:
            while True:
                try:
                    if failed:
                        recovered.append(self._recovery.recover(session, start, failed))
                        failed = ""
                    self._migration.migrate(session)
                    if not tokens:  # the session's start: open it on every hop
                        for hop in session.route:
                            self._stepper.open(session, hop)
                        result = m.StepResult()
                        break
                    pending = self._stepper.start(session, tokens, start, sample)
                    if event is not None:
                        try:
                            yield event
                        except GeneratorExit:  # the client went away while the step ran: stop it
                            pending.cancel()
                            with contextlib.suppress(Exception):
                                pending.result()
                            raise
                        event = None
                    result = pending.result()
                    break
                except CapacityError:
                    raise  # no node can take the lost range: trying again cannot help
                except PeerError as e:
                    if event is not None:  # the client has the last token before a recovery or an error
                        yield event
                        event = None
                    attempts += 1
                    if not self._stepper.failover_enabled:
                        raise PeerError(self._recovery.without_failover(session, str(e))) from None
                    if attempts > MAX_RECOVERIES_PER_STEP:
                        raise PeerError(f"{e}; gave up after {attempts - 1} recoveries at one step") from None
                    failed = str(e)
        except Exception:
            if event is not None:
                yield event
            raise
        if event is not None:
            yield event
        session.tokens.extend(tokens)
        session.positions = start + len(tokens)
        self._stepper.note_compute(session, result)
        if len(tokens) == 1 and self._sessions.count() == 1:
            # A decode step alone on the route (another session's step would count in its compute).
            self._measurer.observe(session.route, self._members.all(), result)
        for records, path, replayed, detected in recovered:
            for record in records:
                self._log.note(record, path, time.monotonic() - detected, replayed)
        return result
