"""ftkit's DPO loss against trl's ``DPOTrainer`` (``loss_type="sigmoid"``) on the same tiny Qwen2 policy and
reference: trl tokenises and collates the pairs; ftkit scores the same tokens with its own per-token CE
(:func:`~ftkit.train.losses.per_token_ce` on the final hidden states), sums them per sequence and applies
:func:`~ftkit.train.losses.dpo_loss`. The two losses agree to float precision."""

from __future__ import annotations

import pytest
import torch

from ftkit.train import losses as Ls
from ftkit.train.recipe import REPO_ROOT

trl = pytest.importorskip("trl", reason="trl is a dev dependency (pip install -e .[dev])")


def _qwen2(vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def _ftkit_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]  # position i predicts token i + 1
    labels = input_ids[:, 1:]
    keep = completion_mask[:, 1:].bool()
    ce = Ls.per_token_ce(hidden[keep], model.lm_head.weight, labels[keep])
    sample = torch.arange(input_ids.shape[0])[:, None].expand_as(labels)[keep]
    return Ls.sequence_logps(ce, sample, input_ids.shape[0])


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_matches_trl(tmp_path, beta):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tiny-backbone")
    policy, ref = _qwen2(len(tok), 0), _qwen2(len(tok), 1)
    pairs = [("a photo of a red circle", "<verdict>ok</verdict>\nThe image matches the prompt.",
              "<verdict>revise</verdict>\nExpected a red circle."),
             ("a photo of two blue squares", "<verdict>revise</verdict>\nExpected 2 squares, found 1.",
              "<verdict>ok</verdict>"),
             ("a photo of a green ring", "<verdict>revise</verdict>", "<verdict>ok</verdict>\nfine")]
    ds = Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pairs])
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=3,
                     report_to=[], use_cpu=True, max_length=None, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, batch).item()
        cols = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logp, ref_logp = _ftkit_logps(policy, *cols), _ftkit_logps(ref, *cols)
    n = len(pairs)  # trl's batch: the chosen sequences, then the rejected ones
    got, margin = Ls.dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], beta)
    assert abs(want - 0.6931) > 1e-3 and margin.abs().min() > 1e-4  # two different models: a real comparison
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
