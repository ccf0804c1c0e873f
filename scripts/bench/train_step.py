"""PyTorch peer of `tevatron train` for the benchmark: Tevatron's training step (shared
encoder, pooling, normalize, q p^T / T, cross-entropy with targets i*G, AdamW, clipping) on the
same rows, batch, group and lengths, timed per optimizer step.

    python train_step.py MODEL TRAIN_JSONL STEPS BATCH GROUP QLEN PLEN POOLING NORMALIZE TEMP [plain|ckpt|lora|lora-ckpt]
Prints one JSON line: seconds per step (median of steps 2..N), peak RSS in MB, losses (and on a
GPU the peak memory PyTorch allocated and reserved, in MB).
TRAIN_STEP_DEVICE=cuda runs on the GPU (timed with synchronisation) and TRAIN_STEP_AMP=bf16|fp16
adds autocast (fp16 with a GradScaler), as the Hugging Face Trainer does for --bf16/--fp16.
TRAIN_STEP_DTYPE=bf16|fp16 loads the model in that dtype (Tevatron loads the base so under
--bf16/--fp16; PEFT keeps the adapters in F32), TRAIN_STEP_ATTN=sdpa|eager|flash_attention_2
picks transformers' attention, TRAIN_STEP_PAD_MULTIPLE (16) pads as --pad_to_multiple_of, and
lora-ckpt is LoRA with gradient checkpointing.
"""
import os
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

torch.set_num_threads(2)
torch.manual_seed(42)
model_dir, path, steps, bs, group, qlen, plen, pooling, normalize, temp = sys.argv[1:11]
mode = sys.argv[11] if len(sys.argv) > 11 else "plain"
steps, bs, group, qlen, plen, temp = int(steps), int(bs), int(group), int(qlen), int(plen), float(temp)
normalize = normalize == "true"
rows = [json.loads(l) for l in open(path)][: steps * bs]
tok = AutoTokenizer.from_pretrained(model_dir)
load_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(os.environ.get("TRAIN_STEP_DTYPE", ""), torch.float32)
attn = {"attn_implementation": os.environ["TRAIN_STEP_ATTN"]} if os.environ.get("TRAIN_STEP_ATTN") else {}
model = AutoModel.from_pretrained(model_dir, torch_dtype=load_dtype, **attn)
device = os.environ.get("TRAIN_STEP_DEVICE", "cpu")
amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(os.environ.get("TRAIN_STEP_AMP", ""))
model.to(device)
model.train()
if mode in ("ckpt", "lora-ckpt"):
    model.gradient_checkpointing_enable()
if mode == "lora-ckpt":  # checkpointed layers need an input that requires grad (as Tevatron does)
    model.enable_input_require_grads()
if mode in ("lora", "lora-ckpt"):  # Tevatron's LoRA defaults: r 16, alpha 64, dropout 0.1, all seven projections
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=64, lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"]))
    model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


pad_multiple = int(os.environ.get("TRAIN_STEP_PAD_MULTIPLE", "16"))  # tevatron's --pad_to_multiple_of


def text(p):
    return p["title"] + " " + p["text"] if "title" in p else p["text"]


def batch(texts, n):
    return tok(texts, truncation=True, max_length=n, padding=True, pad_to_multiple_of=pad_multiple, return_tensors="pt").to(device)


def encode(b):
    h = model(**b).last_hidden_state
    if pooling == "cls":
        r = h[:, 0]
    elif pooling == "last":  # right padding: the last real token
        r = h[torch.arange(h.shape[0]), b["attention_mask"].sum(1) - 1]
    else:
        m = b["attention_mask"].unsqueeze(-1).float()
        r = (h * m).sum(1) / m.sum(1)
    return F.normalize(r, dim=-1) if normalize else r


def sync():
    if device != "cpu":
        torch.cuda.synchronize()


scaler = torch.amp.GradScaler(device) if amp == torch.float16 else None
times, losses = [], []
for s in range(steps):
    chunk = rows[s * bs:(s + 1) * bs]
    qs = [r["query"] for r in chunk]
    ps = [text(p) for r in chunk for p in ([r["positive_passages"][0]] + r["negative_passages"][: group - 1])]
    sync()
    t = time.perf_counter()
    qb, pb = batch(qs, qlen), batch(ps, plen)
    with torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
        q, p = encode(qb), encode(pb)
        scores = (q @ p.T).float() / temp
    loss = F.cross_entropy(scores, torch.arange(len(qs), device=device) * group)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad()
    sync()
    times.append(time.perf_counter() - t)
    losses.append(loss.item())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result = {"sec_per_step": statistics.median(times[1:]), "peak_rss_mb": rss, "losses": losses}
if device != "cpu":
    result["gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
print(json.dumps(result))
