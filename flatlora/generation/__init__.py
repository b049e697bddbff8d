"""Generation and its scoring: batched greedy / beam decoding and the official E2E NLG metrics.

``generate_texts`` decodes prompts as training encodes them; ``score_generations`` computes
BLEU, NIST, METEOR, ROUGE_L and CIDEr exactly as the official E2E script does.
"""

from flatlora.generation.generate import DECODING_PRESETS, GenerationSettings, generate_texts

__all__ = ["DECODING_PRESETS", "GenerationSettings", "generate_texts", "score_generations"]


def __getattr__(name: str):
    if name == "score_generations":  # the metrics module loads only when scoring
        from flatlora.generation.e2e_metrics import score_generations

        return score_generations
    raise AttributeError(f"module 'flatlora.generation' has no attribute {name!r}")
