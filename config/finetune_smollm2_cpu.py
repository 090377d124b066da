# SmolLM2-135M-Instruct plus the latent head, fine-tuned for a few minutes on one CPU thread on a synthetic
# task (sorting digits), ending with its eval table per step k. Before: `python data/prepare.py model
# --out_dir=data/smollm2-135m` (README "Any pretrained LM"); then `python sample.py --out_dir=out-smollm2-cpu
# --start="sort(3142)=" --temperature=0 --show_steps=True`.
# Measured 2026-12-06 on this project's 2-core machine, both cores busy with two other training runs: 6 m 09 s
# (3.2 GB peak memory); answer exact match on sort:5 0.00 at iter 0, 0.65 at 30, 0.80 at 60, at k = 1 and 2.
out_dir = "out-smollm2-cpu"
init_from = "data/smollm2-135m"
device = "cpu"
compile = False
threads = 1
fluency_data = "pydoc"
reasoning_data = "synthetic"
reasoning_tasks = "sort:5"
reasoning_fraction = 0.5

n_steps = 2
n_latent = 64
sampled_supervision = True      # its 49,152-token vocabulary: the K unembeddings would dominate
block_size = 64
batch_size = 4
gradient_accumulation_steps = 1

learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
max_iters = 60
lr_decay_iters = 60
weight_decay = 0.1

eval_interval = 30
eval_iters = 4
eval_examples = 40
log_interval = 10
