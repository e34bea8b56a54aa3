"""Drop-in integrations with training libraries. Nothing here is imported by ``import fastdpo``, and this
package imports nothing heavy; import the submodule you need:

- ``fastdpo.integrations.trl``: ``FastDPOTrainer`` (a ``trl.DPOTrainer`` computing the per-token work and the
  objective with fastdpo) and ``patch_fused_lm_head()`` (fastdpo's kernel behind TRL's fused LM head, for the
  GRPO / RLOO / KTO / SFT trainers). Needs TRL (``pip install -e ".[trl]"`` in a checkout).
- ``fastdpo.integrations.transformers``: per-token log-probs and DPO-family losses straight from a Hugging Face
  causal LM's final hidden states and LM head (soft cap and logit scale read from its config), without logits.
- ``fastdpo.integrations.torchtune`` / ``fastdpo.integrations.openrlhf``: loss modules with the call signatures
  of torchtune's and OpenRLHF's DPO losses, built on fastdpo's loss registry (neither library is needed).
"""
