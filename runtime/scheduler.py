"""Which sequences run in the next engine step.

Every step: running sequences decode one token each first, then partially
prefilled prompts continue, then new sequences are admitted while the step's token
budget (`max_batch_tokens`) and `max_running` allow. A long prompt is cut into
chunks so it never stalls the others' decoding. Waiting requests queue per adapter
(FCFS inside a queue) and admission takes the queues' heads round-robin, so a
popular adapter cannot starve a rare one.

Every planned chunk first gets its KV blocks (`grow`). When the pool runs dry, the
newest running sequence is preempted (`preempt` frees its blocks; it goes back to the
front of its queue and later recomputes its prompt and output so far), so the oldest
sequence always makes progress: no deadlock, and no request fails for lack of KV.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable, Hashable

from .errors import QueueFullError
from .sequence import SeqStatus, Sequence


class Admission(enum.Enum):
    ADMIT = "admit"  # resources taken: the sequence runs from this step on
    WAIT = "wait"  # not yet (adapter loading, no free slot or KV); retry next step
    DROP = "drop"  # the sequence was failed or cancelled; remove it from the queue


class Scheduler:
    def __init__(self, max_running: int, max_batch_tokens: int, max_queue: int) -> None:
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.running: list[Sequence] = []
        self._queues: dict[Hashable, deque[Sequence]] = {}
        self._order: deque[Hashable] = deque()  # round-robin over adapters with waiting requests
        self._num_waiting = 0
        self._lock = threading.Lock()

    @staticmethod
    def queue_key(seq: Sequence) -> Hashable:
        return seq.adapter

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def waiting(self) -> list[Sequence]:
        with self._lock:
            return [seq for q in self._queues.values() for seq in q]

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (any thread); QueueFullError at `max_queue` waiting."""
        with self._lock:
            if self._num_waiting >= self.max_queue:
                raise QueueFullError(f"{self._num_waiting} requests are waiting (max_queue={self.max_queue}); retry later")
            self._enqueue(seq, front=False)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """Into its adapter's queue (at the front: a preempted sequence goes first). Holds the lock."""
        key = self.queue_key(seq)
        if key not in self._queues:
            self._queues[key] = deque()
            if front:
                self._order.appendleft(key)
            else:
                self._order.append(key)
        if front:
            self._queues[key].appendleft(seq)
        else:
            self._queues[key].append(seq)
        self._num_waiting += 1

    def remove_waiting(self, seq: Sequence) -> bool:
        with self._lock:
            queue = self._queues.get(self.queue_key(seq))
            if queue is None or seq not in queue:
                return False
            queue.remove(seq)
            self._num_waiting -= 1
            self._drop_empty(self.queue_key(seq))
            return True

    def _drop_empty(self, key: Hashable) -> None:
        if not self._queues[key]:
            del self._queues[key]
            self._order.remove(key)

    def finish(self, seq: Sequence) -> None:
        """Take a running sequence out (finished, cancelled or failed)."""
        if seq in self.running:
            self.running.remove(seq)

    def schedule(self, admit: Callable[[Sequence], Admission], grow: Callable[[Sequence, int], bool],
                 preempt: Callable[[Sequence], None]) -> list[tuple[Sequence, int]]:
        """The step's plan: [(sequence, number of new tokens)], within the token budget.

        `grow(seq, n)` takes the KV blocks for seq's next n tokens (False: the pool is short);
        `preempt(seq)` gives back everything seq holds before it re-queues.
        """
        plan: dict[Sequence, int] = {}  # insertion-ordered

        def budget() -> int:
            return self.max_batch_tokens - sum(plan.values())

        def fits(seq: Sequence, n: int) -> bool:
            """Blocks for seq's n tokens, preempting newer sequences while the pool is short."""
            while not grow(seq, n):
                if self.running[-1] is seq:
                    return False
                self._preempt(self.running[-1], preempt, plan)
            return True

        for seq in list(self.running):  # decode first: one token each (budget >= max_running)
            # (a sequence whose token in flight is its last by length ends when it is read back)
            if seq in self.running and not seq.in_prefill and seq.num_tokens < seq.max_len:
                if fits(seq, 1):
                    plan[seq] = 1
                else:  # the newest sequence and the pool is dry: it waits for a recompute
                    self._preempt(seq, preempt, plan)
        for seq in list(self.running):  # then continue chunked prefills, oldest first
            if seq in self.running and seq.in_prefill and budget() > 0:
                n = min(seq.num_tokens - seq.computed, budget())
                if fits(seq, n):
                    plan[seq] = n
        while budget() > 0 and len(self.running) < self.max_running:
            admitted = self._admit_one(admit)
            if admitted is None:
                break
            n = min(admitted.num_tokens - admitted.computed, budget())
            if not fits(admitted, n):  # admission checked the pool, so only a bug lands here
                self._preempt(admitted, preempt, plan)
                break
            plan[admitted] = n
        return list(plan.items())

    def _preempt(self, seq: Sequence, preempt: Callable[[Sequence], None], plan: dict[Sequence, int]) -> None:
        """Stop `seq` for now: out of the plan and the running list, back to the front of its queue."""
        plan.pop(seq, None)
        self.running.remove(seq)
        preempt(seq)
        seq.status = SeqStatus.WAITING
        with self._lock:
            self._enqueue(seq, front=True)

    def _admit_one(self, admit: Callable[[Sequence], Admission]) -> Sequence | None:
        """Admit the head of the next adapter queue (round-robin) that can run now."""
        with self._lock:
            keys = list(self._order)
        for key in keys:
            while True:
                with self._lock:
                    queue = self._queues.get(key)
                    if not queue:
                        break
                    head = queue[0]
                decision = admit(head)
                if decision is Admission.WAIT:
                    break
                with self._lock:
                    if self._queues.get(key) and self._queues[key][0] is head:
                        self._queues[key].popleft()
                        self._num_waiting -= 1
                        self._drop_empty(key)
                        if key in self._queues:  # served: go to the back of the round-robin
                            self._order.remove(key)
                            self._order.append(key)
                if decision is Admission.ADMIT:
                    head.status = SeqStatus.RUNNING
                    self.running.append(head)
                    return head
                # DROP: look at the next request of the same queue
        return None
