"""`gemma-mtp serve` under `mlx.launch`: rank 0 serves, every other rank mirrors its engine.

The target and drafter are split over the ranks (distributed.py), so every rank must run
every engine operation, in the same order. Rank 0's generation thread (`LockstepWorker`)
records the rows it inserts and removes, and before each `engine.step()` broadcasts them
(`distributed.broadcast_json`); every other rank (`follow`) applies them to its own engine
and steps with it. Nothing else crosses the wire: a request travels as numbers (its
penalties' logits processors are rebuilt on each rank by `insert_request`) with a seed
drawn on rank 0 when it has none, so sampled rows draw alike everywhere. Uids agree
because every engine numbers its rows in insertion order. Only rank 0 binds a port.

A step that fails, on any rank, ends the run (`end_run`): unlike a lone server, which
fails the rows in flight and goes on, ranks cannot tell whether they still agree.
"""

import os
from typing import Callable, List

from .. import distributed
from ..batch import RowEvent
from .worker import Worker, insert_request

STOP = ["stop"]  # the last operation rank 0 sends: its server shut down


class LockstepWorker(Worker):
    """Rank 0's generation thread: a `Worker` whose engine operations also reach the other ranks."""

    def __init__(self, load: Callable[[], object], group):
        super().__init__(load)
        self.group = group
        self.operations: List[list] = []  # since the last step, in order

    def insert_row(self, prompt: List[int], request: dict) -> int:
        distributed.refuse_adaptive_k([request.get("num_draft_tokens")], "num_draft_tokens")  # 400, sent nowhere
        if request["seed"] is None:
            request = dict(request, seed=distributed.random_seed())
        uid = super().insert_row(prompt, request)  # a refused request raises here: nothing to send
        self.operations.append(["insert", prompt, request])
        return uid

    def remove_row(self, uid: int) -> None:
        super().remove_row(uid)
        self.operations.append(["remove", uid])

    def step_rows(self) -> List[RowEvent]:
        self._send()
        try:
            return super().step_rows()
        except Exception as e:  # the ranks may have parted ways (a lost rank, for one): end the run
            end_run(f"a generation step failed: {e}")

    def _run(self) -> None:
        super()._run()
        if self.engine is not None:  # loaded, now stopping: the other ranks stop too
            self.operations.append(STOP)
            self._send()

    def _send(self) -> None:
        try:
            distributed.broadcast_json(self.operations or None, self.group)
        except Exception as e:
            end_run(f"lost the other ranks: {e}")
        self.operations = []


def follow(load_engine: Callable[[], object], group) -> None:
    """A rank other than 0: load its share of the pair, then apply rank 0's operations and
    step with it until rank 0 stops. Prints nothing; ends when any rank dies."""
    distributed.quiet_other_ranks(group)
    distributed.exit_when_terminated(group)
    engine = load_engine()
    while True:
        for operation, *arguments in distributed.broadcast_json(None, group) or []:
            if operation == "insert":
                insert_request(engine, *arguments)
            elif operation == "remove":
                engine.remove(*arguments)
            else:  # STOP
                return
        try:
            engine.step()
        except Exception as e:
            end_run(f"a generation step failed: {e}")


def end_run(reason: str) -> None:
    """Ranks that no longer step together cannot go on: say why and exit, from any thread
    (the launcher then ends the other ranks; rank 0's clients see their connections close)."""
    message = f"gemma-mtp{distributed.rank_label()}: error: {reason}; the server stops\n"
    os.write(distributed.error_stream().fileno(), message.encode())
    os._exit(1)
