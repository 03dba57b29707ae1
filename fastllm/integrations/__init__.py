"""Hugging Face glue: ``fastllm.integrations.transformers`` (the "fastllm" attention implementation) and
``fastllm.integrations.trainer`` (adapter-only Trainer checkpoints; its names are exported here on first use, so
importing the attention glue does not import ``transformers.Trainer``)."""

_TRAINER_NAMES = ("AdapterCheckpointMixin", "Trainer")

__all__ = list(_TRAINER_NAMES)


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from fastllm.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
