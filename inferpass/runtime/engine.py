"""The engine: continuous batching of generation requests over a program's graphs.

``Engine(executable, rows=8)`` (or ``Engine.open(folder_or_model_dir, target=...)``) owns a ``CachePool``
of ``rows`` sequence slots, a ``Scheduler`` and a ``StepRunner``. ``submit`` checks a request and queues
it; each ``step`` admits what fits, decodes every running request by one token, prefills chunks of the
oldest new prompts within the step's token budget, samples per request and retires finished, cancelled
or failed requests (their rows go back to the pool at once); a higher-``priority`` request preempts a
running one by recompute when no row is free (``scheduler``). ``generate`` runs a list of requests to the
end; ``stream`` yields ``(request, token)`` as tokens are produced. Time per step is split into
``stats``: scheduling, target calls, sampling.
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
from inferpass.runtime.step_runner import StepRunner
from inferpass.targets.base import Executable, get_target


class Engine:
    """Continuous batching over ``executable`` (a decoder program) with ``rows`` cache slots."""

    def __init__(self, executable: Executable, *, rows: int = 8, prefill_chunk: int = 256, step_tokens: int = 1024):
        program = executable.program
        if not program.is_decoder:
            raise InferpassError(f"{program.info.architecture} is not a decoder; nothing to generate")
        self.program = program
        self.pool = CachePool(program.cache, rows, executable.device)
        self.scheduler = Scheduler(self.pool, prefill_chunk, step_tokens)
        self.runner = StepRunner(executable, self.pool)
        self.stats = {"steps": 0, "schedule_s": 0.0, "sampling_s": 0.0}

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
        try:
            logits = self.runner.decode([r.tokens[-1] for r in plan.decode])
        except Exception as exc:  # noqa: BLE001  (a target failure fails the requests of this step, not the engine)
            for request in plan.decode:
                self._fail(request, exc)
            return
        for request, row in zip(plan.decode, logits):
            self._emit(request, row, produced)

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
