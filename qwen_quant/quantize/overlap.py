"""Overlap host work with device work in the layer loop: a background checkpoint writer and a
prefetcher that reads the next layer's tensors while the current one is quantized.

Both are plain threads: safetensors reads and writes release the GIL, so disk I/O runs beside the
GPU kernels the main thread queues. Errors from the worker are re-raised in the main thread at the
next call, so a failed write still aborts the run (and the writer's temp folder) as before.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch


class BackgroundWriter:
    """`CheckpointWriter.add` on a worker thread; at most ``depth`` layers wait in host memory."""

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="qwen-quant-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.add(item)
                except BaseException as err:  # re-raised in the main thread
                    self.error = err

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue host copies of ``tensors`` (moved off the device here, once per call)."""
        self._check()
        self.q.put({k: v.detach().to("cpu") for k, v in tensors.items()})

    def drain(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()

    def finish(self, *args, **kwargs):
        self.drain()
        return self.writer.finish(*args, **kwargs)

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            self.q.put(None)
            self.thread.join()
        self.writer.abort()


class Prefetcher:
    """Runs ``read(key)`` for the next key on a thread; ``get(key)`` returns it (or reads it now)."""

    def __init__(self, read: Callable[[str], dict]):
        self.read = read
        self.key: str | None = None
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, key: str) -> None:
        self.wait()
        self.key, self.result, self.error = key, None, None

        def work():
            try:
                self.result = self.read(key)
            except BaseException as err:
                self.error = err

        self.thread = threading.Thread(target=work, name="qwen-quant-prefetch", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def get(self, key: str) -> dict:
        if self.key == key:
            self.wait()
            self.key = None
            if self.error is None and self.result is not None:
                out, self.result = self.result, None
                return out
        return self.read(key)
