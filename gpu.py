"""gpu.py: the speed machinery that only pays on a GPU, kept out of vjepa_reacher.py's way: pinned uploads, TF32
while planning, one function captured as a CUDA graph on static buffers (CEM, `--set plan_graph=on`) and torch.compile
of V-JEPA 2's encoder at a few fixed batch sizes (`--set compile=on`). Off CUDA each piece runs the same code eagerly,
so the CPU tests check it; bench.py times it on a GPU. Imports nothing from the script."""
import contextlib

import torch


def upload(array, device):
    """numpy -> device; on CUDA from pinned memory, so the copy runs asynchronously (from pageable it would not)."""
    x = torch.from_numpy(array)
    return x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else x.to(device)


@contextlib.contextmanager
def tf32(device):
    """TF32 matmuls inside the block on CUDA (CEM ranks costs and does not need fp32's last bits), then the old
    setting back. Only PyTorch's fp32_precision API is used: while it says tf32, PyTorch refuses reads of the legacy
    flags (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision), so nothing here reads them."""
    old = torch.backends.cuda.matmul.fp32_precision
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


class Graphed:
    """fn(*tensors) -> a tuple of tensors, run on static buffers, one set per shape of the inputs. On CUDA, fn is
    warmed up on a side stream with the first real inputs of a shape, then captured as a CUDA graph (as
    torch.cuda.graph asks), and later calls replay it: one launch for its hundreds of kernels. Elsewhere fn runs
    eagerly on the same buffers. Each call copies its inputs in and returns clones of the outputs."""

    def __init__(self, fn):
        self.fn, self.captured = fn, {}

    def __call__(self, *inputs):
        key = tuple(x.shape for x in inputs)
        if key not in self.captured:
            self.captured[key] = self.capture(inputs)
        buffers, graph, outputs = self.captured[key]
        for buffer, x in zip(buffers, inputs):
            buffer.copy_(x)
        if graph is None:
            outputs = self.fn(*buffers)
        else:
            graph.replay()
        return tuple(y.clone() for y in outputs)

    def capture(self, inputs):
        buffers = [x.clone() for x in inputs]
        if not buffers[0].is_cuda:
            return buffers, None, None
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            outputs = self.fn(*buffers)
        return buffers, graph, outputs


class Compiled(torch.nn.Module):
    """V-JEPA 2's encoder under torch.compile with static shapes (dynamic=False): a batch of n windows goes up padded
    to the next power of two from 8 (8, 16, 32, ...), so each of those few sizes compiles once and none again, and
    RL's 8 environments are not padded to --batch-size. The padded rows are dropped from the output. The first call
    runs eagerly: it builds rope.py's tables, which the compiled graph would otherwise recompile for once."""

    def __init__(self, encoder, backend="inductor"):
        super().__init__()
        self.eager, self.encoder, self.warm = encoder, torch.compile(encoder, backend=backend, dynamic=False), False

    def forward(self, pixel_values_videos, **kwargs):
        if not self.warm:
            self.warm = True
            return self.eager(pixel_values_videos=pixel_values_videos, **kwargs)
        x, n = pixel_values_videos, len(pixel_values_videos)
        size = max(8, 1 << (n - 1).bit_length())
        out = self.encoder(pixel_values_videos=torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])]), **kwargs)
        out.last_hidden_state = out.last_hidden_state[:n]
        return out
