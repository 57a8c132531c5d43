"""The peer reference for `switchyard bench peer`: the same Mixtral forward written directly in PyTorch
(CPU), reading the checkpoint's safetensors without any Switchyard code. It times the forward and writes
the logits so the bench can compare them with ours. `--backend numpy` runs the identical maths with NumPy,
which lets the test suite check this script where PyTorch is not installed.

usage: mixtral_forward.py CHECKPOINT_DIR IDS_FILE(int32) BATCH TOKENS OUT_LOGITS(float32) [--reps N] [--backend torch|numpy]
prints one JSON line: {"seconds": median forward seconds, "backend": ..., "threads": ...}
"""
import json
import math
import os
import struct
import sys
import time


def read_safetensors(path):
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {info['dtype']}; this reference reads F32 checkpoints")
        begin, end = info["data_offsets"]
        out[name] = (info["shape"], data[begin:end])
    return out


def load_checkpoint(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(folder, f)))
    return json.load(open(os.path.join(folder, "config.json"))), tensors


class Torch:
    def __init__(self):
        import torch
        self.t = torch
        torch.set_grad_enabled(False)
        self.threads = torch.get_num_threads()

    def tensor(self, shape, raw):
        return self.t.frombuffer(bytearray(raw), dtype=self.t.float32).reshape(shape)

    def ids(self, raw, shape):
        return self.t.frombuffer(bytearray(raw), dtype=self.t.int32).reshape(shape).long()

    def linear(self, x, w):
        return x @ w.T

    def softmax(self, x):
        return self.t.softmax(x, dim=-1)

    def topk(self, x, k):
        values, indices = self.t.topk(x, k, dim=-1)
        return values, indices

    def silu(self, x):
        return x * self.t.sigmoid(x)

    def numpy(self, x):
        return x.contiguous().numpy().astype("float32")

    def swap(self, x, a, b):
        return x.transpose(a, b)

    def mean_last(self, x):
        return x.mean(-1, keepdim=True)

    def sum_last(self, x):
        return x.sum(-1, keepdim=True)

    def where(self, mask):
        return mask.nonzero(as_tuple=True)

    cat = property(lambda self: (lambda xs, axis: self.t.cat(xs, dim=axis)))
    zeros_like = property(lambda self: self.t.zeros_like)
    rsqrt = property(lambda self: self.t.rsqrt)


class Numpy:
    def __init__(self):
        import numpy
        self.np = numpy
        self.threads = 1

    def tensor(self, shape, raw):
        return self.np.frombuffer(raw, dtype=self.np.float32).reshape(shape).copy()

    def ids(self, raw, shape):
        return self.np.frombuffer(raw, dtype=self.np.int32).reshape(shape).astype(self.np.int64)

    def linear(self, x, w):
        return x @ w.T

    def softmax(self, x):
        e = self.np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def topk(self, x, k):
        indices = self.np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return self.np.take_along_axis(x, indices, axis=-1), indices

    def silu(self, x):
        return x / (1 + self.np.exp(-x))

    def numpy(self, x):
        return x.astype("float32")

    def swap(self, x, a, b):
        return self.np.swapaxes(x, a, b)

    def mean_last(self, x):
        return x.mean(-1, keepdims=True)

    def sum_last(self, x):
        return x.sum(-1, keepdims=True)

    def where(self, mask):
        return mask.nonzero()

    cat = property(lambda self: (lambda xs, axis: self.np.concatenate(xs, axis=axis)))
    zeros_like = property(lambda self: self.np.zeros_like)
    rsqrt = property(lambda self: (lambda x: 1 / self.np.sqrt(x)))


def forward(xp, cfg, w, ids):
    """Hugging Face Mixtral numerics: RMSNorm, rotate-half RoPE, GQA, softmax top-k routing renormalised."""
    batch, tokens = ids.shape
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    k = cfg["num_experts_per_tok"]
    experts = cfg["num_local_experts"]
    eps = cfg.get("rms_norm_eps", 1e-5)
    theta = cfg.get("rope_theta", 10000.0)

    def norm(x, weight):
        return x * xp.rsqrt(xp.mean_last(x * x) + eps) * weight

    half = head_dim // 2
    freqs = [theta ** (-(2 * i) / head_dim) for i in range(half)]
    angles = [[p * f for f in freqs] for p in range(tokens)]
    cos_t = xp.tensor([tokens, half], struct.pack(f"<{tokens * half}f", *[math.cos(a) for row in angles for a in row]))
    sin_t = xp.tensor([tokens, half], struct.pack(f"<{tokens * half}f", *[math.sin(a) for row in angles for a in row]))
    cos = xp.cat([cos_t, cos_t], axis=-1)
    sin = xp.cat([sin_t, sin_t], axis=-1)

    def rope(x):  # x: [batch, heads, tokens, head_dim]
        rotated = xp.cat([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = [[0.0 if j <= i else -1e30 for j in range(tokens)] for i in range(tokens)]
    causal = xp.tensor([tokens, tokens], struct.pack(f"<{tokens * tokens}f", *[v for row in mask for v in row]))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = xp.swap(xp.linear(h, w[p + "self_attn.q_proj.weight"]).reshape(batch, tokens, heads, head_dim), 1, 2)
        kk = xp.swap(xp.linear(h, w[p + "self_attn.k_proj.weight"]).reshape(batch, tokens, kv_heads, head_dim), 1, 2)
        v = xp.swap(xp.linear(h, w[p + "self_attn.v_proj.weight"]).reshape(batch, tokens, kv_heads, head_dim), 1, 2)
        q, kk = rope(q), rope(kk)
        group = heads // kv_heads
        kk = xp.cat([kk[:, i // group:i // group + 1] for i in range(heads)], axis=1)
        v = xp.cat([v[:, i // group:i // group + 1] for i in range(heads)], axis=1)
        scores = q @ xp.swap(kk, 2, 3) / math.sqrt(head_dim) + causal
        attn = xp.swap(xp.softmax(scores) @ v, 1, 2).reshape(batch, tokens, heads * head_dim)
        x = x + xp.linear(attn, w[p + "self_attn.o_proj.weight"])
        h = norm(x, w[p + "post_attention_layernorm.weight"]).reshape(batch * tokens, hidden)
        probs = xp.softmax(xp.linear(h, w[p + "block_sparse_moe.gate.weight"]))
        top, chosen = xp.topk(probs, k)
        top = top / xp.sum_last(top)
        out = xp.zeros_like(h)
        for e in range(experts):
            rows, slots = xp.where(chosen == e)
            if len(rows) == 0:
                continue
            e_p = p + f"block_sparse_moe.experts.{e}."
            xe = h[rows]
            y = xp.linear(xp.silu(xp.linear(xe, w[e_p + "w1.weight"])) * xp.linear(xe, w[e_p + "w3.weight"]), w[e_p + "w2.weight"])
            weight = top[rows, slots].reshape(-1, 1)
            # Accumulate per token (a token chooses an expert at most once).
            out[rows] = out[rows] + weight * y
        x = x + out.reshape(batch, tokens, hidden)
    x = norm(x, w["model.norm.weight"])
    return xp.linear(x, w["lm_head.weight"])


def main():
    argv = sys.argv[1:]
    opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and not (i > 0 and argv[i - 1].startswith("--"))]
    reps = int(opts.get("--reps", "5"))
    backend = opts.get("--backend", "torch")
    folder, ids_file, batch, tokens, out_file = args[0], args[1], int(args[2]), int(args[3]), args[4]
    xp = Torch() if backend == "torch" else Numpy()
    cfg, raw = load_checkpoint(folder)
    weights = {name: xp.tensor(shape, data) for name, (shape, data) in raw.items()}
    ids = xp.ids(open(ids_file, "rb").read(), (batch, tokens))
    logits = forward(xp, cfg, weights, ids)
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        forward(xp, cfg, weights, ids)
        samples.append(time.perf_counter() - started)
    samples.sort()
    with open(out_file, "wb") as f:
        f.write(xp.numpy(logits).tobytes())
    print(json.dumps({"seconds": samples[len(samples) // 2], "backend": backend, "threads": xp.threads}))


if __name__ == "__main__":
    main()
