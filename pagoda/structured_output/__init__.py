"""Engine layer: structured output — constraints on the generated text turned into per-token masks.

Built on llguidance (see README's structured-output section for why it and
not xgrammar). `grammar` turns a request's `StructuredOutputsParams` into an
llguidance grammar and checks it without a tokenizer, so the front end can
refuse a bad schema with a 400 before the request is queued; `manager` lives
beside the scheduler in the engine core: it builds matchers on a thread of
its own, keeps one per request, and packs the token bitmask of each step's
constrained rows into the `SchedulerOutput`, which the sampler applies.
"""
