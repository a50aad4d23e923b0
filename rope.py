"""Correct and cached rotary positions for transformers' V-JEPA 2 (VJEPA2Model), in one file to copy alone.

transformers' VJEPA2 attention rebuilds its rotary sin/cos tables in every layer on every call, and lays the
tokens on the checkpoint's crop_size // patch_size grid whatever the input's size. `install(model, "input")`
caches the tables per (grid, device, dtype) and takes positions from each input's real grid;
`install(model, "checkpoint")` keeps transformers' positions, only cached. Needs torch and transformers.

    model = VJEPA2Model.from_pretrained("facebook/vjepa2-vitl-fpc64-256")
    rope.install(model, "input")  # None, and a warning, if this transformers' attention is not the expected one
"""
import warnings

import torch


class Tables:
    """V-JEPA 2's rotary position tables, cached per (token grid, device, dtype). transformers' rebuilding costs ~95
    of a layer's ~115 kernel launches; its checkpoint grid gives 770 of 784 tokens a wrong (t, h, w) at 224 px (14 x 14
    patches). grid 'input' reads the real grid from each input; 'checkpoint' keeps transformers' positions (the
    seed's). The tables use transformers' own arithmetic, so where positions agree the output is bit-identical."""

    def __init__(self, config, grid):
        self.config, self.grid, self.thw, self.tables = config, grid, None, {}

    def see_input(self, embeddings, inputs):  # forward pre-hook on the patch embedding: pixels (B, T, C, H, W)
        T, (H, W), c = inputs[0].shape[1], inputs[0].shape[-2:], self.config
        self.thw = (max(T, c.tubelet_size) // c.tubelet_size, H // c.patch_size, W // c.patch_size)

    def positions(self, n, device):
        ids, g = torch.arange(n, device=device), self.config.crop_size // self.config.patch_size
        h, w = self.thw[1:] if self.grid == "input" else (g, g)
        return ids // (h * w), ids % (h * w) // w, ids % w  # frame, row, column of each token

    def cos_sin(self, n, head_size, device, dtype):
        key = (n, self.thw if self.grid == "input" else None, device, dtype)
        if key not in self.tables:
            d = 2 * ((head_size // 3) // 2)  # transformers' d_dim = h_dim = w_dim
            omega = torch.arange(d // 2, dtype=dtype, device=device) / (d / 2.0)
            freqs = [pos.unsqueeze(-1) * (1.0 / 10000 ** omega) for pos in self.positions(n, device)]
            self.tables[key] = tuple(torch.cat([f(x).repeat(1, 2) for x in freqs], -1) for f in (torch.cos, torch.sin))
        return self.tables[key]

    def rotate(self, qk, pos_ids=None):
        """qk (B, heads, N, head_size): the first 3 d dims rotated by frame, row and column; the rest kept."""
        cos, sin = self.cos_sin(qk.shape[-2], qk.shape[-1], qk.device, qk.dtype)
        x = qk[..., :cos.shape[-1]]
        y1, y2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.cat([x * cos + torch.stack((-y2, y1), -1).flatten(-2) * sin, qk[..., cos.shape[-1]:]], -1)


def install(model, grid):
    """Tables on each encoder layer of a loaded VJEPA2Model, per instance, if its attention is the one they
    were written for (checked bit for bit on a random input); else None and a warning: transformers' code stays."""
    from transformers.models.vjepa2 import modeling_vjepa2 as hf
    rope, layers, c = Tables(model.config, grid), [layer.attention for layer in model.encoder.layer], model.config
    rope.thw = (2, c.crop_size // c.patch_size, c.crop_size // c.patch_size)  # a 4-frame clip, for the check
    attn, n = layers[0], rope.thw[0] * rope.thw[1] ** 2
    try:
        qk = torch.randn(1, attn.num_attention_heads, n, attn.attention_head_size,
                         generator=torch.Generator().manual_seed(0))
        ok = all(type(a) is hf.VJEPA2RopeAttention for a in layers) and torch.equal(
            attn.apply_rotary_embeddings(qk, attn.get_position_ids(qk[:, 0])), rope.rotate(qk))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        ok = False
    rope.tables.clear()
    if not ok:
        warnings.warn("this transformers' VJEPA2 attention is not the one the RoPE cache was written for; using "
                      "its own (slower, tokens on the checkpoint's grid)", stacklevel=2)
        return None
    model.encoder.embeddings.register_forward_pre_hook(rope.see_input)
    for a in layers:
        a.get_position_ids, a.apply_rotary_embeddings = (lambda x, masks=None: None), rope.rotate
    return rope
