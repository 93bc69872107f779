"""--score_model: a reward model rates each answer from 0 to 1, as h2oGPT showed under its answers."""
from __future__ import annotations

from .errors import UserError, missing_package
from .machine import Machine

# h2oGPT's score_model='auto'
H2OGPT_DEFAULT = "OpenAssistant/reward-model-deberta-v3-large-v2"


class RewardScorer:
    """A sequence-classification model with one output; sigmoid(logit) of (question, answer) is the score."""

    def __init__(self, name: str, gpu_id: int = 0):
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise missing_package("transformers", "hf", "--score_model") from None
        self.torch = torch
        name = H2OGPT_DEFAULT if name == "auto" else name
        device = Machine.probe(torch_view=True).torch_device(gpu_id)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load --score_model={name}: {str(e).splitlines()[0]}") from None
        if self.model.config.num_labels != 1:
            raise UserError(f"--score_model={name} is not a reward model: it has {self.model.config.num_labels} "
                            "outputs, a reward model has one")
        self.device = device

    def score(self, question: str, answer: str) -> float:
        inputs = self.tokenizer(question, answer, return_tensors="pt", truncation=True, max_length=1024)
        with self.torch.inference_mode():
            logit = self.model(**inputs.to(self.device)).logits[0, 0]
        return float(self.torch.sigmoid(logit.float()))
