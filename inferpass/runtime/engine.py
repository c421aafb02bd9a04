"""The engine: continuous batching of generation requests over a program's graphs.

``Engine(executable, rows=8)`` (or ``Engine.open(folder_or_model_dir, target=...)``) owns a ``CachePool``
of ``rows`` sequence slots, a ``Scheduler`` and a ``StepRunner``. ``submit`` checks a request and queues
it; each ``step`` admits what fits, decodes every running request by one token, prefills chunks of the
oldest new prompts within the step's token budget, samples per request and retires finished, cancelled
or failed requests (their rows go back to the pool at once); a higher-``priority`` request preempts a
running one by recompute when no row is free (``scheduler``). ``generate`` runs a list of requests to the
end; ``stream`` yields ``(request, token)`` as tokens are produced. Time per step is split into
``stats``: scheduling, target calls, sampling.

A program with an early-exit draft graph (pass ``early-exit``) decodes self-speculatively where the
``speculation`` policy says it pays (``auto``: measured per decode-batch bucket; ``always``; ``never``):
every decoding row drafts at its own pace, one verify step checks all of them, and each row keeps what
it accepted (``runtime.speculation``; greedy output is plain decoding's). ``stats`` then counts drafted
and accepted tokens. Seeded sampling is reproducible alone or batched under ``always`` or ``never``;
under ``auto`` the policy's choices (timing-dependent) change which random draws a request makes, not
the distribution of its tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from pydantic import ValidationError

from inferpass.capture import capture
from inferpass.errors import InferpassError
from inferpass.ir.output_folder import MANIFEST
from inferpass.ir.serialize import load_program, read_manifest
from inferpass.runtime.cache_pool import CachePool
from inferpass.runtime.generator import token_id
from inferpass.runtime.sampling import SamplingParams, sample
from inferpass.runtime.scheduler import Request, Scheduler, Step
from inferpass.runtime.speculation import Draft, SpeculationPolicy, accept, propose
from inferpass.runtime.step_runner import StepRunner, decode_bucket
from inferpass.targets.base import Executable, get_target


class Engine:
    """Continuous batching over ``executable`` (a decoder program) with ``rows`` cache slots."""

    def __init__(self, executable: Executable, *, rows: int = 8, prefill_chunk: int = 256, step_tokens: int = 1024,
                 speculation: str = "auto"):
        program = executable.program
        if not program.is_decoder:
            raise InferpassError(f"{program.info.architecture} is not a decoder; nothing to generate")
        self.program = program
        self.pool = CachePool(program.cache, rows, executable.device)
        self.scheduler = Scheduler(self.pool, prefill_chunk, step_tokens)
        self.runner = StepRunner(executable, self.pool)
        try:
            self.policy = SpeculationPolicy(speculation)
        except ValueError as exc:
            raise InferpassError(f"speculation: {exc}") from None
        self.draft = program.draft_graph()
        if self.draft is not None and not program.cache.supports_rollback:
            raise InferpassError("this program has an early-exit draft graph but a cache that cannot be rolled back "
                                 "(kv-quant after early-exit); put kv-quant before early-exit or leave one out")
        if self.draft is not None:
            self.spec = program.roles[self.draft].draft
            self.verify = program.graph_for(self.spec.length + 1)
        self.stats = {"steps": 0, "schedule_s": 0.0, "sampling_s": 0.0, "verify_steps": 0, "verified_rows": 0,
                      "drafted": 0, "accepted": 0}

    @classmethod
    def open(cls, path: str | Path, *, target: str = "eager", max_len: int | None = None, **options) -> "Engine":
        """An engine over a saved inferpass folder (loaded; ``max_len`` must be None) or a Hugging Face model
        directory (captured with a cache of ``max_len`` slots), compiled for ``target``."""
        path = Path(path)
        if (path / MANIFEST).is_file():
            if max_len is not None:
                raise InferpassError(f"{path} is a saved program with max_len {read_manifest(path)['cache']['max_len']}"
                                     "; max_len applies to a model directory")
            program = load_program(path)
        else:
            program = capture(path, max_len=max_len)
        return cls(get_target(target).compile(program), **options)

    def submit(self, prompt: list[int], params: SamplingParams | dict | None = None,
               on_token: Callable[[Request, int], None] | None = None, priority: int = 0) -> Request:
        """Queue a request (``priority``: higher runs first and may preempt lower ones, see ``scheduler``);
        raises ``InferpassError`` naming the field at fault (nothing is queued then)."""
        try:
            params = params if isinstance(params, SamplingParams) else SamplingParams.model_validate(params or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InferpassError(f"bad sampling parameters: {problems}") from None
        vocab, max_len = self.program.info.vocab_size, self.program.cache.max_len
        if isinstance(prompt, (str, bytes)) or not len(prompt):
            raise InferpassError("prompt: a request needs a non-empty list of token ids")
        ids = [token_id(t, f"prompt position {i}", vocab) for i, t in enumerate(prompt)]
        for t in params.stop_token_ids:
            token_id(t, "stop_token_ids", vocab)
        if params.stop and vocab != 256:
            raise InferpassError("stop: stop strings need a byte-level model (vocabulary 256); use stop_token_ids")
        if len(ids) + params.max_new_tokens - 1 > max_len:
            raise InferpassError(f"prompt: {len(ids)} tokens + max_new_tokens {params.max_new_tokens} need "
                                 f"{len(ids) + params.max_new_tokens - 1} cache positions; the program's max_len is "
                                 f"{max_len}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InferpassError(f"priority: an integer is needed, got {priority!r}")
        request = Request(ids, params, on_token, priority)
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` now; its row is free for the next step."""
        if not request.done:
            self.scheduler.remove(request)
            request.state, request.finish_reason = "cancelled", "cancelled"

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def step(self) -> list[tuple[Request, int]]:
        """Run one step (module doc); the ``(request, token)`` pairs it produced."""
        t0 = time.perf_counter()
        plan = self.scheduler.plan()
        self.stats["schedule_s"] += time.perf_counter() - t0
        produced: list[tuple[Request, int]] = []
        if plan.decode:
            self._decode(plan, produced)
        for request, start, end in plan.prefills:
            if not request.done:
                self._prefill(request, start, end, produced)
        self.stats["steps"] += 1
        return produced

    def _decode(self, plan: Step, produced: list) -> None:
        requests, before = plan.decode, len(produced)
        bucket = decode_bucket(len(requests), self.pool.rows)
        drafting = self.draft is not None and self._verify_fits() and self.policy.drafts(bucket)
        t0 = time.perf_counter()
        try:
            if drafting:
                emitted = self._speculate(requests)
            else:
                logits = self.runner.decode([r.tokens[-1] for r in requests])
        except Exception as exc:  # noqa: BLE001  (a target failure fails the requests of this step, not the engine)
            for request in requests:
                self._fail(request, exc)
            return
        for i, request in enumerate(requests):
            if not drafting:
                self._emit(request, logits[i], produced)
                continue
            for token in emitted[i]:
                if request.done:
                    break
                self._append(request, token, produced)
        self.policy.record(bucket, drafting, time.perf_counter() - t0, len(produced) - before)

    def _verify_fits(self) -> bool:
        """Whether a verify step fits every row it may run over (decoding rows and the rows padding them)."""
        return int(self.pool.lengths.max()) + self.spec.length + 1 <= self.program.cache.max_len

    def _speculate(self, requests: list[Request]) -> list[list[int]]:
        """Draft for every decoding row, verify in one step, roll each row back to what it kept; the tokens
        each row emits (``runtime.speculation``)."""
        pool, spec, n = self.pool, self.spec, len(requests)
        base = pool.lengths[:n].clone()
        limits = [min(spec.length, r.params.max_new_tokens - len(r.tokens) - 1) for r in requests]
        drafts = [Draft(open=limit > 0) for limit in limits]
        current = [r.tokens[-1] for r in requests]
        while any(d.open for d in drafts):
            logits = self.runner.decode(current, self.draft)  # writes layers < E's KV, lengths + 1
            t0 = time.perf_counter()
            for i, (request, draft) in enumerate(zip(requests, drafts)):
                if draft.open:
                    propose(logits[i], draft, spec, request.params, request.generator)
                    draft.open = draft.open and len(draft.tokens) < limits[i]
                    current[i] = draft.tokens[-1] if draft.tokens else current[i]
            self.stats["sampling_s"] += time.perf_counter() - t0
        pool.lengths[:n] = base
        width = spec.length + 1
        ids = torch.tensor([[r.tokens[-1], *d.tokens] + [0] * (width - 1 - len(d.tokens))
                            for r, d in zip(requests, drafts)])
        logits = self.runner.steps(ids, self.verify)
        t0 = time.perf_counter()
        emitted = [accept(d, logits[i], spec, r.params, r.generator) for i, (r, d) in enumerate(zip(requests, drafts))]
        self.stats["sampling_s"] += time.perf_counter() - t0
        pool.lengths[:n] = base + torch.tensor([len(tokens) for tokens in emitted])  # the last token and kept drafts
        self.stats["verify_steps"] += 1
        self.stats["verified_rows"] += n
        self.stats["drafted"] += sum(len(d.tokens) for d in drafts)
        self.stats["accepted"] += sum(len(tokens) - 1 for tokens in emitted)
        return emitted

    def _prefill(self, request: Request, start: int, end: int, produced: list) -> None:
        try:
            context = request.context
            logits = self.runner.prefill(self.pool.row_of(request), torch.tensor([context[start:end]]))[0, -1]
        except Exception as exc:  # noqa: BLE001
            self._fail(request, exc)
            return
        request.prefilled = end
        if end == len(context):
            self.pool.start_decoding(request)
            request.state = "decode"
            self._emit(request, logits, produced)

    def _emit(self, request: Request, logits: torch.Tensor, produced: list) -> None:
        t0 = time.perf_counter()
        token = sample(logits, request.params, request.generator)
        self.stats["sampling_s"] += time.perf_counter() - t0
        self._append(request, token, produced)

    def _append(self, request: Request, token: int, produced: list) -> None:
        request.tokens.append(token)
        produced.append((request, token))
        if request.on_token is not None:
            request.on_token(request, token)
        reason = self._finish_reason(request, token)
        if reason is not None and not request.done:
            self.scheduler.remove(request)
            request.state, request.finish_reason = "finished", reason

    def _finish_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        if token in params.stop_token_ids:
            return "stop"
        if params.stop:
            text = bytes(request.tokens[-max(map(len, params.stop)) * 4:]).decode("utf-8", "ignore")
            if any(text.endswith(s) for s in params.stop):
                return "stop"
        if len(request.tokens) >= params.max_new_tokens:
            return "length"
        return None

    def _fail(self, request: Request, exc: Exception) -> None:
        self.scheduler.remove(request)
        request.state, request.error = "failed", f"{type(exc).__name__}: {exc}"

    def stream(self) -> Iterator[tuple[Request, int]]:
        """Step until every submitted request is done, yielding each ``(request, token)`` as produced."""
        while not self.idle:
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | dict | None = None) -> list[Request]:
        """Run ``prompts`` (with shared ``params``) to the end; a request that fails its checks comes back
        ``failed`` with the error, and the others still run."""
        requests = []
        for prompt in prompts:
            try:
                requests.append(self.submit(prompt, params))
            except InferpassError as exc:
                failed = Request([], SamplingParams())
                failed.state, failed.error = "failed", str(exc)
                requests.append(failed)
        for _ in self.stream():
            pass
        return requests
