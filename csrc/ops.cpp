// Every pyssl operator schema lives here; kernels register per device in csrc/<op>/{cpu,cuda}/.
// Autograd formulas and fake (meta) kernels are registered in Python (pyssl/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pyssl, m) {
  // ---- fused L2-normalised similarity + InfoNCE (csrc/infonce) ---------------------------
  // NT-Xent over z = cat(view0, view1) of shape (2N, d): self-similarity excluded, row i's
  // positive is i +- N, mean over the 2N rows. Returns (loss, lse) where lse holds the
  // per-row log-sum-exp, the only state the backward needs besides z.
  m.def("ntxent_forward(Tensor z, float temperature) -> (Tensor loss, Tensor lse)");
  m.def("ntxent_backward(Tensor grad_loss, Tensor z, Tensor lse, float temperature) -> Tensor");
  // InfoNCE of query (M, d) against key (K, d), K >= M, positive of row i is key i; logits are
  // logit_scale * cos(query_i, key_j). symmetric=True is the CLIP loss (M == K): the mean of
  // the row and the column cross-entropies. lse_col is empty when symmetric=False.
  m.def(
      "infonce_forward(Tensor query, Tensor key, Tensor logit_scale, bool symmetric) "
      "-> (Tensor loss, Tensor lse_row, Tensor lse_col)");
  m.def(
      "infonce_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor logit_scale, "
      "Tensor lse_row, Tensor lse_col, bool symmetric) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_logit_scale)");

  // ---- MoCo queue logits + cross-entropy (csrc/moco) --------------------------------------

  // ---- momentum EMA over a parameter list (csrc/ema) --------------------------------------

  // ---- batched image augmentations (csrc/augment) -----------------------------------------
}
