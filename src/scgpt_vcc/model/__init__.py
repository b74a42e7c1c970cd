"""scGPT perturbation model (own implementation of scgpt's TransformerGenerator) and I/O."""

from scgpt_vcc.model.checkpoint import save_checkpoint
from scgpt_vcc.model.loading import load_finetuned, load_pretrained
from scgpt_vcc.model.random_checkpoint import write_random_checkpoint
from scgpt_vcc.model.transformer import TransformerGenerator
from scgpt_vcc.model.vocab import VocabMatch, match_genes

__all__ = [
    "TransformerGenerator",
    "VocabMatch",
    "load_finetuned",
    "load_pretrained",
    "match_genes",
    "save_checkpoint",
    "write_random_checkpoint",
]
