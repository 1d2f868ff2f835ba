"""Chapter 2's "open the box" recipe: a probe on one layer written with transformers and torch
calls only gives the same states and the same chip as ``companion.chips`` (tiny models)."""

import pytest
import torch
import torch.nn.functional as F

from companion import chips
from companion.arch import hidden_size, num_layers
from companion.config import seed_everything
from companion.models import load_lm

TASK = chips.Task("sentiment", ("negative", "neutral", "positive"))
WORDS = {"negative": ["awful", "bad", "sad"], "neutral": ["table", "chair", "paper"],
         "positive": ["great", "happy", "good"]}
ROWS = [{"text": f"Example {i}: it was {word}", "label": label}
        for i in range(3) for label, words in WORDS.items() for word in words]


@pytest.fixture(scope="module", params=["tiny-opt", "tiny-llama"])
def lm(request):
    seed_everything()
    return load_lm(request.param)


@torch.no_grad()
def plain_states(model, tokenizer, texts, layer):
    """The notebook's recipe: one prompt at a time, ``hidden_states[layer + 1]`` at the last token."""
    return torch.stack([model.base_model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
                        .hidden_states[layer + 1][0, -1] for text in texts])


def test_hidden_states_below_the_last_block_equal_the_cached_features(lm):
    model, tokenizer = lm
    prompts = chips.format_prompts(ROWS, TASK)
    cached = chips.extract_features(model, tokenizer, prompts, batch_size=4, progress=False).states
    for layer in range(num_layers(model) - 1):
        torch.testing.assert_close(plain_states(model, tokenizer, prompts, layer), cached[layer],
                                   rtol=1e-4, atol=1e-4)


def test_a_plain_linear_probe_trained_the_same_way_is_the_package_chip(lm):
    model, tokenizer = lm
    prompts = chips.format_prompts(ROWS, TASK)
    targets = chips.row_targets(ROWS, TASK)
    seed, layer, epochs, lr, batch_size = 3, num_layers(model) - 2, 5, 3e-3, 8
    chipped = chips.ChippedModel(model, tokenizer, TASK, seed=seed)
    features = chipped.features(prompts, progress=False, label_scores=False)
    chipped.fit(features, targets, epochs=epochs, lr=lr, batch_size=batch_size, progress=False)

    states = plain_states(model, tokenizer, prompts, layer)
    torch.manual_seed(seed)  # the package draws one chip per layer from the seed
    probe = [torch.nn.Linear(hidden_size(model), TASK.num_classes) for _ in range(layer + 1)][layer]
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=order).split(batch_size):
            loss = F.cross_entropy(probe(states[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    package_chip = chipped.chips.chips[layer]
    torch.testing.assert_close(probe.weight, package_chip.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probe.bias, package_chip.bias, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(probe(states).argmax(-1), chipped.layer_scores(features)[layer].argmax(-1))
