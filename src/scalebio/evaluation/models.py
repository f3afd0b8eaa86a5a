"""Models for evaluation: ``load_model`` (a directory, hub id or GGUF file) and the lm-eval ``HFLM`` wrapper that
encodes our response tasks as training tokenises them."""

from __future__ import annotations


def _scalebio_lm_class():
    from lm_eval.models.huggingface import HFLM

    class ScalebioHFLM(HFLM):
        """HFLM that encodes the context and target of our response tasks (docs with ``n_response_bytes``)
        separately, as training tokenises prompt and response (no whitespace moved across the boundary, no BOS
        added: the rendered context already has it when training does). Other tasks use lm-eval's encoding."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            new_reqs = []
            for req in requests:
                context, continuation = req.args
                doc = getattr(req, "doc", None)
                if isinstance(doc, dict) and "n_response_bytes" in doc and context:
                    context_enc = self.tok_encode(context, add_special_tokens=False)
                    continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
                elif context:
                    context_enc, continuation_enc = self._encode_pair(context, continuation)
                else:  # lm-eval's empty-context rule: condition on the prefix token
                    continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
                    if self.prefix_token_id != continuation_enc[0]:
                        context_enc = [self.prefix_token_id]
                    else:
                        context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"{getattr(req, 'task_name', 'task')}: a target of {len(continuation_enc)} tokens "
                                     f"does not fit the scoring window of {self.max_length} (evaluate's max_length)")
                new_reqs.append(((context, continuation), context_enc, continuation_enc))
            return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    return ScalebioHFLM


def load_model(model: str, gguf_file: str | None = None, device: str | None = None):
    """(model, tokenizer) for evaluation from a directory or hub id (or a GGUF file inside it): bf16 on a GPU,
    fp32 on the CPU, in eval mode on ``device`` (default cuda when available); a missing pad token is eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
    return lm, tokenizer


def _make_lm(model_dir_or_model, tokenizer, batch_size: int, device: str, max_length: int | None = None):
    import torch
    from lm_eval.api.model import LM

    if isinstance(model_dir_or_model, LM):
        return model_dir_or_model, type(model_dir_or_model).__name__
    cls = _scalebio_lm_class()
    if isinstance(model_dir_or_model, torch.nn.Module):
        # An in-memory model stays where it is (HFLM ignores `device` for it).
        name = getattr(model_dir_or_model, "name_or_path", None) or type(model_dir_or_model).__name__
        return cls(pretrained=model_dir_or_model, tokenizer=tokenizer, batch_size=batch_size,
                   max_length=max_length), str(name)
    model_dir = str(model_dir_or_model)
    return cls(pretrained=model_dir, tokenizer=tokenizer if tokenizer is not None else model_dir,
               batch_size=batch_size, device=device, dtype="float32", max_length=max_length), model_dir
