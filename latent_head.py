"""
The RLRP latent head: K bounded residual refinement steps of a latent state z, run on every token.
README "The method in one screen"; the code below uses the same symbols.

    z_0 = tanh(W_in · LN_h(h_t))
    for k = 1..K:
        u_k = MLP([LN_z(z_{k-1}) ; LN_h(h_t)])      # input injection: every step sees h_t
        z_k = z_{k-1} + β ⊙ (tanh(u_k) − z_{k-1})   # bounded residual iteration, β = sigmoid(b) ∈ (0,1)^D
        o_k = h_t + W_out · z_k                      # back to the hidden space; W_out starts at 0

z_k is a convex combination of z_{k-1} ∈ [−1,1]^D and tanh(u_k) ∈ [−1,1]^D, so it never leaves the
box however many steps run (I1). The head is position-wise: it never mixes tokens (I3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class LatentHead(nn.Module):

    def __init__(self, n_embd, n_latent, bias=True, mlp_ratio=4):
        super().__init__()
        hidden = mlp_ratio * n_latent
        self.ln_h = nn.LayerNorm(n_embd, bias=bias)           # LN_h
        self.w_in = nn.Linear(n_embd, n_latent, bias=bias)    # W_in
        self.ln_z = nn.LayerNorm(n_latent, bias=bias)         # LN_z
        # MLP([LN_z(z); LN_h(h)]): its first layer is split into a z-part and an h-part. Identical to one
        # Linear on the concatenation, but the h-part is the same at every step, so it is computed once.
        self.fc_z = nn.Linear(n_latent, hidden, bias=False)
        self.fc_h = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_latent, bias=bias)
        self.b = nn.Parameter(torch.zeros(n_latent))           # β = sigmoid(b); starts at 0.5
        self.w_out = nn.Linear(n_latent, n_embd, bias=bias)   # W_out
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.w_in, self.fc_z, self.fc_h, self.proj):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.b)
        # I2: W_out (and its bias) start at zero, so o_k = h_t and the augmented model is exactly its trunk
        nn.init.zeros_(self.w_out.weight)
        if self.w_out.bias is not None:
            nn.init.zeros_(self.w_out.bias)

    def start(self, h):
        """h (..., C) -> z_0 (..., D), and what every step reuses: (injection (..., H), β (D,))."""
        hn = self.ln_h(h)                                   # LN_h(h_t)
        # the h-part of the MLP's first layer is the same at every step: computed once
        return torch.tanh(self.w_in(hn)), (self.fc_h(hn), torch.sigmoid(self.b))

    def step(self, z, inject, beta):
        """One refinement step k: z_{k-1} (..., D) -> z_k (..., D)."""
        u = self.proj(F.gelu(self.fc_z(self.ln_z(z)) + inject, approximate="tanh"))  # u_k
        return z + beta * (torch.tanh(u) - z)                                          # z_k

    def out(self, h, z):
        """o_k = h_t + W_out · z_k, back in the hidden space (..., C)."""
        return h + self.w_out(z)

    def forward(self, h, n_steps, return_latents=False, grad_steps=None):
        """
        h: (B, T, C) trunk output. Returns o: (K, B, T, C), o[k-1] = o_k, and with return_latents=True
        also z: (K+1, B, T, D), z[k] = z_k.
        grad_steps: backpropagate through only the last `grad_steps` steps of the recurrence (None = all).
        Earlier steps run without autograd, so they cost no activation memory; their o_k still pass
        gradient to h and W_out through the loss on step k.
        """
        K = n_steps
        first_grad_step = 1 if grad_steps is None else max(1, K - grad_steps + 1)
        z, fixed = self.start(h)                   # z_0 (B, T, D)
        if first_grad_step > 1:
            z = z.detach()
        zs, outs = [z], []
        for k in range(1, K + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= first_grad_step):
                z = self.step(z, *fixed)           # z_k
            zs.append(z)
            outs.append(self.out(h, z))            # o_k
        o = torch.stack(outs)                      # (K, B, T, C)
        return (o, torch.stack(zs)) if return_latents else o
