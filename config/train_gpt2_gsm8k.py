# Augment pretrained GPT-2 (124M) with a latent head and continue training on GSM8K + fluency text.
# Before (README "Data"): `python data/prepare.py reasoning --hf_dataset=openai/gsm8k --hf_config=main
# --out_dir=data/gsm8k` (train.jsonl, test.jsonl) and fluency text in data/openwebtext:
# `python data/prepare.py fluency --hf_dataset=Skylion007/openwebtext --out_dir=data/openwebtext`, or
# --fluency_data=pydoc to try it without.
# By I2 the augmented model starts exactly at GPT-2's logits.
out_dir = "out-gpt2-gsm8k"
init_from = "gpt2"
tokenizer = "gpt2"
fluency_data = "data/openwebtext"
reasoning_data = "data/gsm8k/train.jsonl"
reasoning_eval_data = "data/gsm8k/test.jsonl"
gsm8k_answer = "final"          # the worked solution is context, the number after #### is the answer span
reasoning_fraction = 0.5

n_steps = 4
n_latent = 384
block_size = 512
batch_size = 8
gradient_accumulation_steps = 32  # over all ranks: 8 GPUs x 4

learning_rate = 1e-4            # fine-tuning: small and flat after a short warmup
min_lr = 1e-5
warmup_iters = 100
max_iters = 3000
lr_decay_iters = 3000
weight_decay = 0.1
dropout = 0.0

eval_interval = 250
eval_iters = 40
eval_examples = 1319            # all of GSM8K's test set
