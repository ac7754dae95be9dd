"""The scorer for a task: one entry point over the decoder-only scorers (`evox_merge.tasks.scoring`), the
encoder-decoder ones (`evox_merge.tasks.seq2seq`) and lm-evaluation-harness metrics on top of them
(`evox_merge.tasks.lm_eval_scoring`, imported only for harness tasks: the harness is an optional extra)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from evox_merge.tasks import Task
from evox_merge.tasks.prefix import MIN_SHARED_PREFIX
from evox_merge.tasks.scoring import GenerationScorer, LanguageModelScorer, MultipleChoiceScorer
from evox_merge.tasks.seq2seq import build_seq2seq_scorer
from evox_merge.util.errors import TaskFormatError


def build_scorer(task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device,
                 min_shared_prefix: int | None = MIN_SHARED_PREFIX, model_config=None, batch_tokens: int | None = None):
    """The scorer for the task's type, with the task tokenised and batched on `device`; rows sharing at least
    `min_shared_prefix` leading tokens continue one run of them (None: never). `batch_tokens`: batches of at most
    that many padded tokens instead of `batch_size` rows (decoder-only models; `evox_merge.tasks.batching`). With
    the config of an encoder-decoder model (``is_encoder_decoder``), the encoder-decoder scorers
    (`evox_merge.tasks.seq2seq`), batched by `batch_size`."""
    if model_config is not None and getattr(model_config, "is_encoder_decoder", False):
        if task.spec.chat_template or task.spec.lm_eval is not None:
            raise TaskFormatError(f"task {task.name!r}: chat templates and lm-evaluation-harness tasks are scored on "
                                  "decoder-only models only")

        return build_seq2seq_scorer(task, tokenizer, batch_size, device, model_config)
    if task.spec.lm_eval is not None:  # the harness's metrics on our scorers' outputs
        from evox_merge.tasks.lm_eval_scoring import build_harness_scorer

        return build_harness_scorer(task, tokenizer, batch_size, device, min_shared_prefix, batch_tokens)
    scorer = {"generation": GenerationScorer, "multiple_choice": MultipleChoiceScorer}.get(
        task.spec.type, LanguageModelScorer)
    return scorer(task, tokenizer, batch_size, device, min_shared_prefix, batch_tokens)
