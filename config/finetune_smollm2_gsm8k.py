# SmolLM2-135M-Instruct plus the latent head, fine-tuned on GSM8K with sampled deep supervision, on one GPU.
# Before: `python data/prepare.py model --out_dir=data/smollm2-135m` (README "Any pretrained LM") and
# `python data/prepare.py reasoning --hf_dataset=openai/gsm8k --hf_config=main --out_dir=data/gsm8k`.
# Cost (model.flops_per_token, block 512, K = 4, sampled): 1,037 MFLOPs per token (913 at K = 0); 16,384
# tokens per step, 300 steps (~4 epochs of GSM8K's train set, packed): 5.1 PFLOPs, under a minute of an H100
# at an ASSUMED 30% MFU; the evals (all 1,319 test questions, 4 times) take longer. No GPU has run it yet.
# By I2 it starts exactly at SmolLM2's logits; the 4-bit GGUF's weights: a recipe to try, not a result.
out_dir = "out-smollm2-gsm8k"
init_from = "data/smollm2-135m"
fluency_data = ""
reasoning_data = "data/gsm8k/train.jsonl"
reasoning_eval_data = "data/gsm8k/test.jsonl"
gsm8k_answer = "final"          # the worked solution is context, the number after #### is the answer span
reasoning_fraction = 1.0

n_steps = 4
sampled_supervision = True      # ~1.25 unembeddings of 49,152 rows per token instead of 4
block_size = 512
batch_size = 16
gradient_accumulation_steps = 2
compile = False                 # an HF trunk keeps HF's eager attention here (torch.compile of it: untested)

learning_rate = 5e-5            # fine-tuning: small, short warmup, cosine to a tenth
min_lr = 5e-6
warmup_iters = 20
max_iters = 300
lr_decay_iters = 300
weight_decay = 0.1
dropout = 0.0

eval_interval = 100
eval_iters = 1                  # no fluency data: the reasoning eval only
eval_examples = 1319            # all of GSM8K's test set
