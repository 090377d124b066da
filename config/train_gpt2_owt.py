# Pretrain GPT-2 small (124M) + the latent head (8.3M; K = 4, D = n_embd) from scratch on OpenWebText:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_owt.py
# Before: `python data/prepare.py fluency --hf_dataset=Skylion007/openwebtext --out_dir=data/openwebtext`
# (~9B GPT-2 tokens in shards; README "Data"). Half the optimizer steps are reasoning steps on the built-in
# synthetic suite.
#
# Figures: analytic, from GPT.flops_per_token on the meta device (tests/test_configs.py recomputes them).
# tokens per optimizer step: batch_size 12 x block_size 1024 x gradient_accumulation_steps 40 = 491,520
#   (40 micro-batches = 5 per GPU; 12,288 tokens per GPU per micro-step)
# training FLOPs per token (K = 4, T = 1024, vocabulary padded to 50304): trunk 622.9M + head 145.1M
#   + unembed 927.2M = 1695.2M; 8.332e14 FLOPs per step. The K unembeddings are 54.7% of it, the head's
#   matmuls 8.6%; 1.98x a plain GPT-2's (K = 0: 854.7M). Not counted: the fused NLL recomputes the logits
#   in backward (8 where 6 are counted per C x V multiply-add), so the kernels run 1.18x these FLOPs.
# ASSUMED 40% MFU (an assumption, not a measurement: no GPU has run this code yet) on 8x H100 SXM at 989
#   TFLOPS bf16 dense each: 0.263 s per step; 50,000 steps in 3.66 h (13,164 s), 24.6B tokens (half of
#   them OpenWebText: ~1.4 epochs). train.py logs the measured mfu against gpu_peak_tflops.
# with sampled_supervision=True (imp_fraction 1/8: ℓ at 1.25 steps per token instead of K): unembed
#   289.8M, total 1057.7M per token; 5.199e14 FLOPs per step, 1.24x a plain GPT-2's; 0.164 s per step at the
#   assumed MFU (the CPU preset kept its losses with it: README "Performance"; GPT-2 small is untried).
# eval (every 1000 steps, at K = 4): fluency val loss on 200 micro-batches over all ranks (25 per GPU),
#   forward only, 1/3 of the training FLOPs per token: 1.389e15 FLOPs, 0.439 s at the assumed MFU;
#   reasoning exact match on 500 synthetic examples, one per row, 42 batches of <= 12 rows trimmed to 20
#   tokens (trunk and head on 10,000 positions, lm_head on 1,166 answer tokens per step): 2.6e12 FLOPs,
#   ~1 ms by FLOPs (tiny batches: launch-bound in practice, unmeasured). Per eval ~0.44 s, 0.17% of the
#   263 s between evals; 51 evals (iter 0 and the end included) ~22 s in all, plus the ~1.6 GB ckpt.pt
#   (fp32 weights + AdamW's moments) that rank 0 writes at each.
out_dir = "out-gpt2-owt"
init_from = "scratch"
wandb_log = False
wandb_project = "nanorlrp"
wandb_run_name = "gpt2-owt-k4"

tokenizer = "gpt2"
fluency_data = "data/openwebtext"
reasoning_data = "synthetic"
reasoning_fraction = 0.5
routing = "step"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40  # over all ranks: 8 GPUs x 5

n_layer = 12
n_head = 12
n_embd = 768
bias = False
dropout = 0.0
n_steps = 4
n_latent = 0                    # D = n_embd = 768
head_attn = "none"

learning_rate = 6e-4            # nanoGPT's GPT-2 small schedule
max_iters = 50000
lr_decay_iters = 50000
warmup_iters = 2000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200                # 25 per GPU: nanoGPT's 200 x 12 rows of val text
eval_examples = 500
log_interval = 10

# device, dtype and compile stay unset: on a GPU node that is cuda, bfloat16 and compiled
gpu_peak_tflops = 989.0         # H100 SXM bf16 dense, for the logged mfu
