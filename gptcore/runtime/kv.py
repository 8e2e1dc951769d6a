"""The KV cache of a generation, on the session's device, in the two layouts LM graphs take.

`SlotCache` (format 3 graphs): per layer one (rows, H, width, D) buffer of keys and one of
values; row r holds one sequence, slot p its token at position p. A graph call binds a run of
rows as both its past and its present, and the graph writes the new tokens' slots in place, so
a step costs the new tokens, not a copy of the cache. Rows are contiguous, so the rows a call
binds must be a run: the engine keeps its decoding sequences in rows 0..n-1. The buffer grows
(by rows, or width in WIDTH_STEP slots up to the context) and shrinks by copying: rare events,
where the growing cache copied itself at every step.

`GrowingCache` (format 1 and 2 graphs): the past (B, H, P, D) is read from one buffer and the
present (B, H, P + T, D) written into the other, the two swapping each step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

WIDTH_STEP = 64  # slots a row's width grows by: fewer copies against fewer unused slots attended over


def cache_width(positions: int, block_size: int) -> int:
    """Slots for `positions` positions, rounded up to WIDTH_STEP, at most block_size."""
    return min(block_size, -(-positions // WIDTH_STEP) * WIDTH_STEP)


class SlotCache:
    """Keys and values of up to `rows` sequences, `width` slots each, per layer.

    On CPU the buffers are numpy arrays the graph writes through their pointers; on CUDA they are
    OrtValues on the GPU, and the rare resizes and row moves go through the host.
    """

    def __init__(self, lm: Any, rows: int = 0, width: int = 0):
        self.lm, self.rows, self.width = lm, 0, 0
        self.on_cpu = lm.device_type == "cpu"
        self.buffers: list[Any] = []
        self.resize(rows, width)

    @property
    def row_bytes(self) -> int:
        return self.lm.n_head * self.width * self.lm.head_dim * np.dtype(self.lm.cache_dtype).itemsize

    def host(self, i: int) -> np.ndarray:
        return self.buffers[i] if self.on_cpu else self.buffers[i].numpy()

    def on_device(self, array: np.ndarray) -> Any:
        if self.on_cpu:
            return array
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.lm.device_type, self.lm.device_id)

    def resize(self, rows: int, width: int) -> None:
        """`rows` rows of `width` slots, keeping what fits of the rows and slots held now."""
        if (rows, width) == (self.rows, self.width):
            return
        lm, keep_rows, keep_width = self.lm, min(rows, self.rows), min(width, self.width)
        resized = []
        for i in range(len(lm.cache_in)):
            array = np.zeros((rows, lm.n_head, width, lm.head_dim), dtype=lm.cache_dtype)
            if keep_rows and keep_width:
                array[:keep_rows, :, :keep_width] = self.host(i)[:keep_rows, :, :keep_width]
            resized.append(self.on_device(array))
        self.buffers, self.rows, self.width = resized, rows, width

    def move(self, src: int, dst: int, slots: int) -> None:
        """Copy the first `slots` slots of row `src` into row `dst`."""
        for i in range(len(self.buffers)):
            array = self.host(i)
            array[dst, :, :slots] = array[src, :, :slots]
            if not self.on_cpu:
                self.buffers[i] = self.on_device(array)

    def bind(self, binding, first_row: int, n_rows: int) -> None:
        """Bind rows first_row .. first_row + n_rows - 1 as the call's past and its present."""
        lm = self.lm
        shape = [n_rows, lm.n_head, self.width, lm.head_dim]
        for i, (name_in, name_out) in enumerate(zip(lm.cache_in, lm.cache_out)):
            buffer = self.buffers[i]
            pointer = (buffer.ctypes.data if self.on_cpu else buffer.data_ptr()) + first_row * self.row_bytes
            binding.bind_input(name_in, lm.device_type, lm.device_id, lm.cache_dtype, shape, pointer)
            binding.bind_output(name_out, lm.device_type, lm.device_id, lm.cache_dtype, shape, pointer)


class GrowingCache:
    """The cache of one generation on a format 1 or 2 graph: per layer keys and values, ping-ponged
    between two buffers of up to (B, H, capacity, D); a step binds the first (B, H, P, D) of one as
    the past and the first (B, H, P + T, D) of the other as the present.
    """

    def __init__(self, lm: Any, batch: int, capacity: int):
        import onnxruntime as ort

        self.lm, self.batch, self.past = lm, batch, 0
        size = [batch * lm.n_head * capacity * lm.head_dim]
        self.buffers = [
            [
                ort.OrtValue.ortvalue_from_shape_and_type(size, lm.cache_dtype, lm.device_type, lm.device_id)
                for _ in lm.cache_in
            ]
            for _ in range(2)
        ]

    def reset(self) -> None:
        self.past = 0

    def bind(self, binding, new_tokens: int) -> None:
        lm, (past, present) = self.lm, self.buffers
        shape_in = [self.batch, lm.n_head, self.past, lm.head_dim]
        shape_out = [self.batch, lm.n_head, self.past + new_tokens, lm.head_dim]
        for name_in, name_out, buf_in, buf_out in zip(lm.cache_in, lm.cache_out, past, present):
            binding.bind_input(name_in, lm.device_type, lm.device_id, lm.cache_dtype, shape_in, buf_in.data_ptr())
            binding.bind_output(name_out, lm.device_type, lm.device_id, lm.cache_dtype, shape_out, buf_out.data_ptr())

    def advance(self, new_tokens: int) -> None:
        self.buffers.reverse()  # this step's present is the next step's past
        self.past += new_tokens
