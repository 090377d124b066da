"""
RLRP training on one CPU, one GPU, or many GPUs.

  python train.py config/train_cpu.py                     # a laptop CPU, a few minutes
  python train.py --batch_size=8 --compile=False          # the default run on one GPU, with overrides
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_owt.py          # one 8-GPU node
  torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py \\
      config/train_gpt2_owt.py --gradient_accumulation_steps=48                  # 16 GPUs: divisible by 16

Each optimizer step is a fluency or a reasoning step (schedules.Router, routing (ii)), the same on every
rank. Micro-batches are drawn by global index (schedules.micro_batch_index) and are pure functions of it, K
is drawn from (seed, iter) and dropout's RNG reseeded from (seed, global micro-batch index): the same config
trains on the same examples with the same masks on 1 process or on W, and a resumed run continues exactly
where the checkpoint left it. Every key, its default and its checks:
config/defaults.py (`--help` lists them).
"""

import importlib.util
import math
import os
import signal
import sys
from contextlib import nullcontext
from time import perf_counter

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
from checkpoint import build_model
from config.defaults import CONSTRAINTS, DEFAULTS, DEFAULTS_FILE
from configurator import ConfigError, catch_stop_signals, configure, precision, setup_system
from evaluate import Records, TrainWindow, all_reduce_sum, eval_metrics, eval_sets, format_eval
from losses import draw_steps, loss_counts, rlrp_loss, sampled_unembeds, step_supervision, step_weights
from schedules import (Curriculum, Router, get_lr, max_n_steps, micro_batches, n_steps_at,
                       progressive_steps, sampling_generator, seed_micro_batch)

# -----------------------------------------------------------------------------
# the config: config/defaults.py's keys, presets and --key=value overrides, or a checkpoint's when resuming


def load_config(argv):
    """(config, checkpoint): with init_from=resume the checkpoint's config is the base that argv overrides
    (checkpoint.resume_config), else DEFAULTS; checkpoint is None unless resuming."""
    c, ckpt = configure(DEFAULTS, argv, doc=__file__, keys_doc=DEFAULTS_FILE), None
    if c["init_from"] == "resume":
        ckpt = checkpoint.load(os.path.join(c["out_dir"], "ckpt.pt"))
        c = checkpoint.resume_config(DEFAULTS, ckpt["config"], argv)
    for holds, message in CONSTRAINTS:
        if not holds(c):
            raise ConfigError(message.format(**c))
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb")
    return c, ckpt

# -----------------------------------------------------------------------------
# the data, and one micro-batch's forward and objective


def load_data(c):
    """(tokenizer, FluencyData | None, ReasoningData | None), light to build; a bad path or file: one line."""
    try:
        tok = data.get_tokenizer(c["tokenizer"], c["tokenizer_file"])
        fluency = data.FluencyData(c["fluency_data"], tok, c["block_size"], c["seed"]) \
            if c["fluency_data"] else None
        reasoning = data.ReasoningData(c["reasoning_data"], tok, c["block_size"], c["seed"],
                                       c["reasoning_eval_data"], c["reasoning_tasks"],
                                       c["gsm8k_answer"], chain_length(c)) if c["reasoning_data"] else None
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return tok, fluency, reasoning


def chain_length(c):
    """ReasoningData's chain_length: None for final-answer targets."""
    return c["chain_length"] if c["step_targets"] == "chain" else None


def step_counts(batches, c, device, world):
    """(Σ m_valid, Σ m_RL, Σ answer tokens) over every micro-batch of this optimizer step on every rank: the
    denominators that make accumulated micro-batches (and DDP) equal one large batch, token for token."""
    counts = torch.zeros(3, dtype=torch.int64)   # integers: exact, and every device has them (no float64)
    for b in batches:
        counts += loss_counts(b.y, b.answer_mask, c["rl_answer_only"], b.rl_rows)
    return all_reduce_sum(counts.to(device), world).float()


def micro_step_loss(model, index, b, kind, K, weights, counts, progressive, c, device):
    """Forward and the RLRP objective of micro-batch `index` (global), b -> (loss, logged): the loss is this
    micro-batch's share of the optimizer step's global mean (counts: step_counts); logged holds the detached
    loss, ds, rl, imp and nll_k (ℓ_1..ℓ_K; sampled: also drawn_k, see rlrp_loss). progressive: this step's
    (n, k) (schedules.progressive_steps) or None."""
    targets, step_w = step_supervision(b.y, K, weights, b.step_y, b.chain_len, b.level, c["beyond_chain"],
                                       c["level_steps"])         # Y, W: (K', B, T) on the CPU
    K1, N, alpha = max(K, 1), b.y.numel(), c["progressive_alpha"]
    draw = draw_steps(step_w, K, b.y.shape, c["imp_fraction"], sampling_generator(c, index)).to(device) \
        if c["sampled_supervision"] else None
    if progressive:                                              # step n+k's targets for its second pass
        targets = torch.cat([targets, targets[sum(progressive) - 1:sum(progressive)]])
    b, step_w = b.to(device), step_w.to(device)
    # the paper's targets are y at every step: a view of the batch's y, not a K-fold copy to move
    targets = targets.to(device) if b.step_y is not None else b.y.expand(len(targets), *b.y.shape)
    n_second = N if progressive else 0    # sampled: ℓ at the draw's rows, then all of the second pass's row
    rows = None if draw is None else torch.cat([draw.rows(), K1 * N + torch.arange(n_second, device=device)])
    _, nll = model(b.x, targets, n_steps=K, grad_steps=c["grad_steps"] or None, progressive=progressive,
                   readout_grad=c["readout_grad"], rows=rows)
    objective = lambda ell, w, d=None: rlrp_loss(ell, b.y, b.answer_mask, kind, w, c["lambda_rl"],
                                                 c["lambda_imp"], c["rl_answer_only"], c["imp_margin"],
                                                 c["rl_q"], c["answer_weight"], counts, b.rl_rows, d)
    split = K1 if draw is None else len(rows) - n_second
    nll, second = nll[:split], nll[split:]
    loss, parts = objective(nll.float(), step_w, draw)
    if progressive:  # L = (1 − α)·L_K + α·L_{n+k}, L_{n+k} the objective on the second pass's last step
        loss = (1 - alpha) * loss + alpha * objective(second.float().view(1, *b.y.shape), torch.ones(1))[0]
    return loss, {"loss": loss.detach(), **parts}


LOGGED = ("loss", "ds", "rl", "imp")   # what every step logs besides nll_k, the per-step ℓ_1..ℓ_K


def all_reduce_logged(logged, stop, world):
    """(logged, ranks asked to stop): an optimizer step's logged sums over every rank, as floats (nll_k a
    list), and how many ranks got a stop signal, in one all-reduce: all ranks stop at the same step. Sampled
    deep supervision: nll_k is ℓ_k's mean over the tokens that drew step k, None where none did."""
    per_step = [logged["nll_k"], *([logged["drawn_k"]] if "drawn_k" in logged else [])]
    flat = torch.cat([torch.stack([logged[k] for k in LOGGED]), *per_step,
                      logged["loss"].new_tensor([float(bool(stop))])])
    values = all_reduce_sum(flat, world).tolist()
    K, n = len(logged["nll_k"]), len(LOGGED)
    nll_k = values[n:n + K]
    if "drawn_k" in logged:
        nll_k = [total / drawn if drawn else None for total, drawn in zip(nll_k, values[n + K:n + 2 * K])]
    return {**dict(zip(LOGGED, values)), "nll_k": nll_k}, values[-1]

# -----------------------------------------------------------------------------
# the run


class Run:
    """One training run: the model (compiled, DDP-wrapped), its optimizer and loss scaler, the data and the
    fixed eval sets, and what rank 0 writes to out_dir: metrics.jsonl (and wandb) and checkpoints."""

    def __init__(self, argv):
        c, ckpt = load_config(argv)
        self.c, self.resumed = c, ckpt is not None
        self.rank, local_rank, self.world, self.device = setup_system(c)
        self.master, device_type = self.rank == 0, self.device.split(":")[0]
        self.ctx, self.scaler = precision(c, device_type)
        torch.manual_seed(c["seed"])
        tok, self.fluency, self.reasoning = load_data(c)
        self.curriculum = Curriculum(c, self.reasoning and self.reasoning.levels, (ckpt or {}).get(
            "curriculum_switches", ()))
        self.router = Router(c["reasoning_fraction"])
        self.raw_model = build_model(c, tok, ckpt).to(self.device)
        self.optimizer = self.raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"],
                                                             (c["beta1"], c["beta2"]), device_type)
        self.start_iter = checkpoint.restore(ckpt, self.optimizer, self.scaler)
        del ckpt  # free the memory
        if c["compile"] if c["compile"] is not None else device_type == "cuda":
            self.raw_model.compile_parts()   # the trunk and one refinement step: any K reuses the same graphs
        self.model = self.raw_model
        if self.world > 1:
            # truncated backward: when K > grad_steps, z_0 is detached and W_in gets no gradient in that step
            self.model = DDP(self.raw_model, device_ids=[local_rank] if device_type == "cuda" else None,
                             find_unused_parameters=0 < c["grad_steps"] < max_n_steps(c))
        self.eval_sets = eval_sets(self.fluency, self.reasoning, c, self.rank, self.world, self.device)
        self.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
        self.peak_tflops = c["gpu_peak_tflops"] if device_type == "cuda" else None   # for MFU
        self.ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
        self.records = Records(os.path.join(c["out_dir"], "metrics.jsonl"))
        if self.master:
            self.start_records()
        self.saved_at = perf_counter()

    def start_records(self):
        """Rank 0's records: metrics.jsonl (a fresh run starts a fresh one) and wandb; and what runs."""
        c = self.c
        os.makedirs(c["out_dir"], exist_ok=True)
        if not c["eval_only"]:
            self.records.start(self.start_iter if self.resumed else None)
        print(f"{self.raw_model.get_num_params() / 1e6:.2f}M parameters | K={c['n_steps']} | {self.world} "
              f"process(es) on {self.device} | {self.tokens_per_iter:,} tokens per iter | "
              f"writing {c['out_dir']}/")
        if c["wandb_log"]:
            import wandb
            wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")
            self.records.wandb = wandb

    def record(self, rec):
        if self.master:
            self.records.write(rec)

    def evaluate(self, it):
        """The eval record at iteration `it`, printed by rank 0."""
        self.raw_model.eval()
        with self.ctx:
            metrics = eval_metrics(self.raw_model, *self.eval_sets, self.c["n_steps"],
                                   self.c["eval_examples"], self.world)
        self.raw_model.train()
        rec = {"type": "eval", "iter": it, "tokens": it * self.tokens_per_iter, **metrics}
        if self.master:
            tqdm.write(format_eval(rec))
        return rec

    def save(self, it):
        if self.master:   # rank 0 alone writes, so its own clock may decide when: no collective
            state = checkpoint.state(self.raw_model, self.optimizer, self.scaler, it, self.c,
                                     self.curriculum.switches)
            checkpoint.save(self.ckpt_path, state)
        self.saved_at = perf_counter()

    def eval_due(self, it):
        return it % self.c["eval_interval"] == 0 or it == self.c["max_iters"]

    def checkpoint_due(self, it):
        """Between evals (which save anyway): every checkpoint_interval steps, and checkpoint_minutes after
        the last checkpoint."""
        c = self.c
        by_steps = c["checkpoint_interval"] and it % c["checkpoint_interval"] == 0
        by_time = c["checkpoint_minutes"] and perf_counter() - self.saved_at > 60 * c["checkpoint_minutes"]
        return not self.eval_due(it) and (by_steps or by_time)

    def check_curriculum(self, it):
        """The threshold curriculum after iteration `it` (schedules.Curriculum.check), in eval mode."""
        self.raw_model.eval()
        with self.ctx:
            joined = self.curriculum.check(it, self.raw_model, self.reasoning, self.rank, self.world,
                                           self.device)
        self.raw_model.train()
        if joined and self.master:
            tqdm.write(joined)

    def flops_per_token(self, it, K):
        """Training FLOPs per token of step `it`: the model's at K, plus the progressive loss's second head
        pass and its one unembedding when it is on; sampled deep supervision: the unembeddings it runs."""
        c = self.c
        N = c["batch_size"] * c["block_size"]
        unembeds = sampled_unembeds(K, N, c["imp_fraction"]) if c["sampled_supervision"] else None
        flops = self.raw_model.flops_per_token(K, c["block_size"], c["grad_steps"], unembeds)["total"]
        progressive = progressive_steps(it, c, K)
        if progressive:
            steps = sum(progressive)                                      # n + k
            second = self.raw_model.flops_per_token(steps, c["block_size"], progressive[1])
            flops += second["head"] + second["unembed"] / steps
        return flops

    def train(self):
        """The training loop. Per optimizer step: evaluate and save when due; the step's kind, K, learning
        rate and micro-batches, functions of (seed, it); forward + backward per micro-batch; clip and step;
        log; the threshold curriculum; a stop signal or a checkpoint when due."""
        c, stop = self.c, catch_stop_signals()
        pbar = tqdm(total=c["max_iters"], initial=self.start_iter, disable=not self.master,
                    dynamic_ncols=True)
        window = TrainWindow(self.tokens_per_iter)
        for it in range(self.start_iter, c["max_iters"] + 1):
            if self.eval_due(it) and not (self.resumed and it == self.start_iter):
                self.record(self.evaluate(it))
                if it > self.start_iter:
                    self.save(it)
            if it == c["max_iters"]:
                break
            t_step = perf_counter()
            # what step `it` trains on: the same on every rank, and on resume
            kind = "reasoning" if c["routing"] == "mixed" else self.router.kind(it)   # mixed: rl_rows decide
            K, lr = n_steps_at(it, c), get_lr(it, c)
            progressive = progressive_steps(it, c, K)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches(it, kind, c, self.fluency, self.reasoning, self.rank, self.world,
                                  self.curriculum.level(it))
            counts = step_counts([b for _, b in micro], c, self.device, self.world)
            weights = step_weights(max(K, 1), c["weight_schedule"], c["weight_gamma"], c["weight_skip"])
            logged = {}
            for m, (index, b) in enumerate(micro):
                seed_micro_batch(c, index)                            # dropout's masks: (seed, index)
                last = m == len(micro) - 1
                # DDP all-reduces the gradients once, after the last micro-batch
                with self.model.no_sync() if self.world > 1 and not last else nullcontext():
                    with self.ctx:
                        loss, parts = micro_step_loss(self.model, index, b, kind, K, weights, counts,
                                                      progressive, c, self.device)
                    # DDP averages gradients over ranks; the loss is already a global mean, so undo the 1/W
                    self.scaler.scale(loss * self.world).backward()
                logged = {k: logged.get(k, 0) + v for k, v in parts.items()}
            logged, stopping = all_reduce_logged(logged, stop, self.world)
            if not math.isfinite(logged["loss"]):
                raise FloatingPointError(f"non-finite loss at iter {it} ({kind} step); parameters not "
                                         f"updated, the last good checkpoint is {self.ckpt_path}; lower "
                                         "learning_rate or check the data")
            if c["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            pbar.update(1)
            window.add(kind, K, logged, self.flops_per_token(it, K), perf_counter() - t_step)
            if (it + 1) % c["log_interval"] == 0:
                rec = window.record(it + 1, lr, self.world, self.peak_tflops)
                if self.curriculum.level(it):   # a curriculum: the highest level this step trained
                    rec["curriculum_level"] = self.curriculum.level(it)
                self.record(rec)
                window = TrainWindow(self.tokens_per_iter)
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if c["curriculum_threshold"] and (it + 1) % c["curriculum_interval"] == 0:
                self.check_curriculum(it + 1)
            if stopping:  # SIGINT / SIGTERM: this step is done; save it and leave
                self.save(it + 1)
                pbar.close()
                self.exit(f"train.py: stopped by a signal after iter {it + 1}; checkpoint written to "
                          f"{self.ckpt_path} (continue with --init_from=resume)",
                          128 + (stop or [signal.SIGTERM])[0])
            if self.checkpoint_due(it + 1):
                self.save(it + 1)
        pbar.close()
        self.exit(f"done: metrics in {self.records.path}, checkpoint in {self.ckpt_path}")

    def exit(self, message=None, code=None):
        """Rank 0 prints the message (to stderr with an exit code); the process group ends; then the exit."""
        if self.master and message:
            print(message, file=sys.stderr if code else sys.stdout)
        if self.world > 1:
            dist.barrier()  # every rank done with its collectives before any tears down (a gloo exit race)
            dist.destroy_process_group()
        if code:
            sys.exit(code)


def main(argv):
    run = Run(argv)
    if run.c["eval_only"]:  # evaluate the model as loaded, once; the checkpoint is left untouched
        run.record(dict(run.evaluate(run.start_iter), type="eval_only"))
        run.exit()
    else:
        run.train()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, FloatingPointError) as e:
        # under torchrun every rank raises the same error: rank 0 says it, the others exit quietly
        sys.exit(f"train.py: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
