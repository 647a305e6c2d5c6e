"""The shared seeded sampling rule (`sglang.srt.mezo.sampling`) as an SGLang custom logit processor.

Requests carry ``temperature 0`` (SGLang decodes greedily) and ``custom_params`` with the
completion's ``seed``, ``temperature`` and ``top_p``; the processor leaves only the token
`sampling.gumbel_choice` draws at the request's next position (counted by the processor). The engine needs ``enable_custom_logit_processor=True``
(`engine_launch.generation_engine_args`).
"""

from __future__ import annotations

from sglang.srt.mezo.sampling import gumbel_choice, only
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class EngineSeededSampling(CustomLogitProcessor):
    """Called once per decoding step of each request, in order: the request's own parameter
    dict (SGLang's per-request copy of ``custom_params``) counts the calls, which is the
    token position. The request's output length is not used: with SGLang's overlap
    scheduler it lags the position by one after the first step (measured on its CPU path:
    0, 0, 1, 2, ... for positions 0, 1, 2, 3)."""

    def __call__(self, logits, custom_param_list=None):
        choices = []
        for i, params in enumerate(custom_param_list):
            params["position"] = position = params.get("position", -1) + 1
            seed, temperature, top_p = params["seed"], params["temperature"], params["top_p"]
            choices.append(gumbel_choice(logits[i : i + 1], [seed], [position], temperature, top_p)[0])
        return only(choices, logits)


def generation_requests(settings, prompts: list) -> dict:
    """`Engine.generate` arguments that generate as `settings` (`generation.GenerationSettings`)
    say from `prompts` (token id lists): ``settings.num_samples`` requests per prompt, a
    prompt's adjacent; greedy, or sampled by `EngineSeededSampling` with the completions' seeds."""
    input_ids = [p for p in prompts for _ in range(settings.num_samples)]
    greedy = {"max_new_tokens": settings.max_new_tokens, "temperature": 0.0}
    if settings.greedy:
        return dict(input_ids=input_ids, sampling_params=[greedy] * len(input_ids))
    sampled = [
        {**greedy, "custom_params": {"seed": seed, "temperature": settings.temperature, "top_p": settings.top_p}}
        for seed in settings.completion_seeds(len(prompts))
    ]
    processor = EngineSeededSampling.to_str()
    return dict(input_ids=input_ids, sampling_params=sampled, custom_logit_processor=[processor] * len(input_ids))
