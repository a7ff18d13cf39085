"""One key table per model family (convert/tables/<family>.py), the exceptions to convert/core.py's name rule.

A table may define:
  IGNORED                  regex patterns of torch keys to drop (non-persistent buffers and the like)
  torch_name(collection, path)   the torch key of a Flax leaf, only where the default rule cannot express it
  normalize(state_dict) -> (state_dict in timm 1.x layout, layout name "timm-1.x" / "timm-0.6" / ...)
  infer(state_dict) -> (model_name, num_classes) or (model_name, num_classes, overrides) or None
                           recognise a checkpoint of this family from its keys and shapes
  GUESSED                  names of overrides `infer` may only guess (the CLI prints a note for them)
  timm_kwargs(overrides) -> kwargs for timm.create_model that build the same architecture as our overrides
                           (raise ValueError for one timm cannot express); without it overrides pass unchanged
  create_timm(model_name, num_classes, kwargs) -> the timm model, where timm's registered entry point cannot
                           build it (swin nano/pico, mobilenetv2 multipliers, Mixer/ResMLP sizes); without it
                           timm.create_model(model_name, num_classes=..., **kwargs)
"""
