"""Compiling a request's output constraint where a crash costs nothing: in a child process.

llguidance compiles grammars recursively in native code: a grammar of 3,000 chained Lark
rules (60 KB) overflows an 8 MiB stack, and a stack overflow is a SIGSEGV that no Python
code can catch, so compiled in the server's process it killed every stream of every
tenant. `RequestLimits` refuses most such grammars by their size and shape first, but no
cheap scan of Lark, GBNF, regex and JSON schema can know llguidance's recursion for
every form. So the front end compiles each constraint, and computes its first mask, in
a child process: a crash or a timeout there is a 400 for that request, and the child
is started again. Why this is enough for the engine core too, which compiles the same
grammar again on its main thread: the child compiles on a thread whose stack is
`CHECK_STACK_BYTES` (1 MiB), and llguidance's recursion for a given grammar is the
same wherever it runs, so a grammar the child compiled fits with 8x to spare in the
core's main thread (8 MiB) and 2x in llguidance's own mask threads (Rust's 2 MiB).

The first mask tells whether the constraint admits anything at all (`{"$ref": "#"}` does
not) and is what the route intersects with `allowed_token_ids` and `min_tokens`
(server/params.py), so that a request no token can start is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from loraserve.engine.core.core_process import start_without_current_folder
from loraserve.engine.sampling.structured import GrammarCompiler, StructuredOutputs, public_error
from loraserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

CHECK_STACK_BYTES = 1 << 20
"""Stack of the child's compiling thread: an eighth of the engine core's main thread."""
CHECK_TIMEOUT_SECONDS = 10.0
"""Longest compilation and first mask of one constraint (the child is killed after)."""
STARTUP_TIMEOUT_SECONDS = 120.0
"""Longest start of a child (importing llguidance, reading the tokenizer)."""
NUM_CHECKERS = 2
"""Child processes, so that one slow constraint does not hold every other's check."""


class GrammarChecker:
    """The front end's compiler of constraints, in child processes started when first needed."""

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self._arguments = (tokenizer_json, vocab_size, tuple(eos_token_ids))
        self._idle: asyncio.Queue[_Child | None] | None = None
        self._children: list[_Child] = []
        self._unavailable: str | None = None
        """Why no child can compile anything (llguidance cannot read this tokenizer)."""

    async def first_mask(self, constraint: StructuredOutputs, param: str) -> np.ndarray:
        """The bitmask of the tokens `constraint` allows first (see
        `GrammarCompiler.first_mask`); InvalidRequestError naming `param` otherwise."""
        if self._unavailable is not None:
            raise InvalidRequestError(self._unavailable, param)
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(NUM_CHECKERS):
                self._idle.put_nowait(None)
        child = await self._idle.get()
        try:
            if child is None or not child.alive:
                child = await asyncio.to_thread(self._start)
            outcome = await asyncio.to_thread(child.check, constraint)
        finally:
            self._idle.put_nowait(child)
        if outcome is None:
            raise InvalidRequestError(
                f"{param}: the constraint is too large or too deeply nested for this server "
                "to compile",
                param,
            )
        kind, value = outcome
        if kind == "unavailable":
            logger.error("structured output is unavailable: %s", value)
            self._unavailable = f"structured output is not available for this model: {value}"
            raise InvalidRequestError(self._unavailable, param)
        if kind == "error":
            raise InvalidRequestError(f"{param}: {value}", param)
        return value  # type: ignore[no-any-return]

    def _start(self) -> _Child:
        child = _Child(self._arguments)
        self._children.append(child)
        self._children = [known for known in self._children if known.alive]
        return child

    def close(self) -> None:
        """Stop the children (the server is shutting down)."""
        for child in self._children:
            child.stop()
        self._children = []


class _Child:
    """One child process that compiles constraints, one at a time; it may die."""

    def __init__(self, arguments: tuple[str, int, tuple[int, ...]]) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=serve_checks, args=(child_end, *arguments), daemon=True, name="grammar-check"
        )
        start_without_current_folder(self._process)
        child_end.close()
        self._ready = False

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def check(self, constraint: StructuredOutputs) -> tuple[str, Any] | None:
        """("ok", mask), ("error", message), or ("unavailable", why) when the child could
        not read the tokenizer; None when the child died or took too long (it is then
        stopped: the next check starts another)."""
        try:
            if not self._ready:
                started = self._receive(STARTUP_TIMEOUT_SECONDS)
                if started[0] == "unavailable":
                    self.stop()
                    return started  # type: ignore[no-any-return]
                self._ready = True
            self._connection.send(constraint)
            outcome = self._receive(CHECK_TIMEOUT_SECONDS)
        except (EOFError, OSError, TimeoutError):
            outcome = None
        if outcome is None:
            logger.warning(
                "a %s constraint killed or stalled its checking process (exit code %s)",
                constraint.kind,
                self._process.exitcode,
            )
            self.stop()
        return outcome

    def _receive(self, timeout: float) -> Any:
        if not self._connection.poll(timeout):
            raise TimeoutError
        return self._connection.recv()

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5)
        self._connection.close()


def serve_checks(
    connection: Connection, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]
) -> None:
    """The child's main: read the tokenizer, then compile each constraint received on a
    thread of `CHECK_STACK_BYTES`, until the front end closes the pipe."""
    try:
        compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_token_ids)
    except Exception as error:  # llguidance cannot read the tokenizer: nothing will compile
        connection.send(("unavailable", public_error(str(error))))
        return
    threading.stack_size(CHECK_STACK_BYTES)
    thread = threading.Thread(target=_check_loop, args=(connection, compiler))
    thread.start()
    thread.join()


def _check_loop(connection: Connection, compiler: GrammarCompiler) -> None:
    connection.send(("ready", None))
    while True:
        try:
            constraint = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send(("ok", compiler.first_mask(constraint)))
        except InvalidRequestError as error:
            connection.send(("error", str(error).split(": ", 1)[-1]))
        except Exception as error:  # e.g. a regex llguidance cannot read: a 400 too
            logger.debug("refused %s constraint", constraint.kind, exc_info=True)
            connection.send(("error", public_error(str(error))))
