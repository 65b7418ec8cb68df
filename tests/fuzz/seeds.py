#!/usr/bin/env python3
"""Seed corpora for the fuzz harnesses (tests/fuzz/run.sh calls this):
small valid inputs of each format, the way qshard's own writers and the
real models make them, plus the first 64 KiB of the default model's GGUF
when it is cached.  seeds.py OUT_DIR [GGUF]"""
import json, os, struct, sys

out = sys.argv[1]
gguf_path = sys.argv[2] if len(sys.argv) > 2 else ""


def put(harness, name, data):
    d = os.path.join(out, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors):
    """GGUF v3: kvs as (key, type, payload bytes), tensors as (name, dims, type, data)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, payload in kvs:
        out += s(k) + struct.pack("<I", t) + payload
    off = 0
    for name, dims, typ, data in tensors:
        out += s(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", n) for n in dims) + struct.pack("<IQ", typ, off)
        off += (len(data) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % 32)
    return out


def kv_str(k, v):
    return (k, 8, s(v))


def kv_u32(k, v):
    return (k, 4, struct.pack("<I", v))


def kv_f32(k, v):
    return (k, 6, struct.pack("<f", v))


def kv_arr_str(k, items):
    return (k, 9, struct.pack("<IQ", 8, len(items)) + b"".join(s(i) for i in items))


def kv_arr_i32(k, items):
    return (k, 9, struct.pack("<IQ", 5, len(items)) + b"".join(struct.pack("<i", i) for i in items))


f32 = lambda n: struct.pack(f"<{n}f", *[0.01 * (i % 7 - 3) for i in range(n)])
tokens = ["<|endoftext|>", "a", "b", "c", "ab", "abc", " ", "Ġ", "Ġa"]
llama = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1),
         kv_u32("llama.embedding_length", 8), kv_u32("llama.feed_forward_length", 16),
         kv_u32("llama.attention.head_count", 2), kv_u32("llama.attention.head_count_kv", 1),
         kv_u32("llama.context_length", 64), kv_f32("llama.rope.freq_base", 10000.0),
         kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
         kv_str("tokenizer.ggml.model", "gpt2"), kv_str("tokenizer.ggml.pre", "smollm"),
         kv_arr_str("tokenizer.ggml.tokens", tokens),
         kv_arr_str("tokenizer.ggml.merges", ["a b", "ab c", "Ġ a"]),
         kv_arr_i32("tokenizer.ggml.token_type", [3] + [1] * (len(tokens) - 1)),
         kv_u32("tokenizer.ggml.bos_token_id", 0), kv_u32("tokenizer.ggml.eos_token_id", 0)]
tensors = [("token_embd.weight", [8, len(tokens)], 0, f32(8 * len(tokens))),
           ("blk.0.attn_q.weight", [8, 8], 1, struct.pack("<64H", *([0x3c00] * 64))),
           ("blk.0.attn_norm.weight", [8], 0, f32(8))]
put("weights", "tiny-llama.gguf", gguf(llama, tensors))
put("weights", "no-tensors.gguf", gguf([kv_str("general.architecture", "llama")], []))
if gguf_path and os.path.exists(gguf_path):
    with open(gguf_path, "rb") as f:
        put("weights", "smollm2-head.gguf", f.read(65536))


def safetensors(tensors, meta=None):
    hdr, off, data = {}, 0, b""
    if meta:
        hdr["__metadata__"] = meta
    for name, shape, payload in tensors:
        hdr[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(payload)]}
        off += len(payload)
        data += payload
    h = json.dumps(hdr).encode()
    return struct.pack("<Q", len(h)) + h + data


put("weights", "tiny.safetensors", safetensors([("a.weight", [2, 3], f32(6)), ("b", [4], f32(4))]))
put("index", "index.json", json.dumps({"metadata": {"total_size": 116}, "weight_map": {
    "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
put("config", "opt.json", json.dumps({"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64,
    "num_attention_heads": 2, "ffn_dim": 128, "vocab_size": 300, "max_position_embeddings": 64,
    "word_embed_proj_dim": 64, "do_layer_norm_before": True}))
put("config", "llama.json", json.dumps({"model_type": "llama", "num_hidden_layers": 2,
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
cfg = {"name": "tiny", "arch": "llama", "norm": "rms", "layers": 1, "hidden": 8, "heads": 2,
       "kv_heads": 1, "head_dim": 4, "ffn": 16, "vocab": 9, "max_pos": 64, "embed_dim": 8,
       "tied_embeddings": 1, "gated_ffn": 1, "linear_bias": 0, "learned_pos": 0, "final_norm": 1,
       "norm_eps": 1e-5, "rope_theta": 10000.0}
meta = {"format": "qshard-checkpoint", "version": "1", "scheme": "rtn", "bits": "4",
        "group_size": "32", "smoothing": "none", "rope": "adjacent", "tp": "1", "rank": "0",
        "config": json.dumps(cfg)}
put("checkpoint", "rank0.safetensors",
    safetensors([("layers.0.attn_norm", [8], f32(8)), ("embed", [9, 8], f32(72))], meta))
put("tokenizer", "text", b"\x01Hello, world! 123 \xc3\xa9t\xc3\xa9")
put("tokenizer", "special", b"\x03<|im_start|>user\nhi<|im_end|>")
put("tokenizer", "ids", b"\x00" + struct.pack("<4i", 1, 2, 49151, 60000))
for i, args in enumerate([["opt-175b"], ["opt-175b", "--bits", "3", "--gpus", "1"],
                          ["smollm2-135m", "--scheme", "w8a8", "--group", "row", "--json"],
                          ["opt-66b", "--device-memory", "40GiB", "--batch", "8", "--seq", "2048"],
                          ["--list"]]):
    put("plan_args", f"args{i}", "\0".join(args))
