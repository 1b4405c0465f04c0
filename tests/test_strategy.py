"""The ES strategy and its noise, with no language model anywhere."""

from __future__ import annotations

import pytest
import torch
from helpers.interpreter import run_interpreted

from evolm.counter_hash import stream_key
from evolm.es.noise import gaussian
from evolm.es.strategy import EvolutionStrategy, shape_fitness

NOISE_KERNEL = r"""
import os
import torch
from evolm.counter_hash import stream_key
from evolm.es import noise
for key, start, count in [(stream_key(7, 3, 1), 12345, 5000), (stream_key(2**40 + 5, 2**33), 2**35 - 7, 3001)]:
    kernel = noise.gaussian(key, start, count)  # the interpreter runs the Triton kernel
    os.environ["TRITON_INTERPRET"] = "0"  # read at each call: the PyTorch ops
    assert torch.equal(kernel, noise.gaussian(key, start, count)), (kernel - noise.gaussian(key, start, count)).abs().max()
    os.environ["TRITON_INTERPRET"] = "1"
print("ok")
"""


def test_the_noise_kernel_draws_exactly_what_the_pytorch_ops_draw():
    """Keys above 2**31 and counters above 2**32 included: the hash's every bit is the same."""
    run_interpreted(NOISE_KERNEL)


def test_noise_is_a_pure_function_of_key_and_counter():
    key = stream_key(7, 3, 1)
    whole = gaussian(key, 0, 5000)
    assert whole.equal(gaussian(key, 0, 5000))
    assert whole[1234:1300].equal(gaussian(key, 1234, 66))  # any slice can be regenerated alone
    other = gaussian(stream_key(7, 3, 2), 0, 5000)
    assert not whole.equal(other)
    big = gaussian(stream_key(1), 0, 200_000)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([whole, other]))[0, 1].item()) < 0.05
    # counters past 2**32 still give fresh values (models with more parameters than that)
    assert not gaussian(key, 2**32, 100).equal(gaussian(key, 0, 100))


def test_antithetic_members_mirror_each_other():
    es = EvolutionStrategy({"w": torch.zeros(50)}, population=6, sigma=0.1, learning_rate=0.1, seed=1)
    members = es.ask().members()["w"]
    assert members.shape == (6, 50)
    assert torch.allclose(members[0], -members[1]) and torch.allclose(members[4], -members[5])
    assert not torch.allclose(members[0], members[2])


def test_each_tensor_gets_its_own_noise():
    es = EvolutionStrategy({"a": torch.zeros(64), "b": torch.zeros(64)}, population=2, sigma=1.0, learning_rate=1.0)
    members = es.ask().members()
    assert abs(torch.corrcoef(torch.stack([members["a"][0], members["b"][0]]))[0, 1].item()) < 0.5
    assert not members["a"][0].equal(members["b"][0])

def test_a_population_is_one_value_for_every_noise_kind_and_keeps_its_generation():
    theta = {"w": torch.randn(12, 8)}
    dense = EvolutionStrategy(theta, population=4, sigma=0.1, learning_rate=0.1, seed=4)
    population = dense.ask()
    stacked = population.members()["w"]
    for m in range(4):  # member by member, as the full space writes them, equals all at once, as LoRA stacks them
        alone = dict(population.perturbed(m))["w"]
        assert torch.allclose(alone, stacked[m], atol=1e-7)
        assert torch.allclose(alone, theta["w"] + 0.1 * population.noise(m)["w"], atol=1e-7)
    first = population.noise(0)["w"].clone()
    dense.tell([1.0, 0.0, 2.0, 3.0])
    assert population.noise(0)["w"].equal(first)  # still generation 0's noise after the next generation began
    assert not first.equal(dense.ask().noise(0)["w"])
    low = EvolutionStrategy(theta, population=4, sigma=0.1, learning_rate=0.1, seed=4, noise_rank=2)
    factors = low.ask()
    (a0, b0), (a1, b1) = factors.noise(0)["w"], factors.noise(1)["w"]
    assert a0.equal(a1) and b0.equal(-b1) and factors.sigma == 0.1 and factors.size == 4
    with pytest.raises(ValueError, match="low-rank"):
        factors.members()


def test_fitness_shaping():
    f = torch.tensor([1.0, 3.0, 2.0, 2.0])
    z = shape_fitness(f, "zscore")
    assert abs(z.mean().item()) < 1e-9 and abs(z.std(unbiased=False).item() - 1) < 1e-6
    r = shape_fitness(f, "centered_rank")
    assert r.tolist() == [-0.5, 0.5, 0.0, 0.0]  # ties share their mean rank
    assert shape_fitness(f, "raw").tolist() == f.tolist()


def test_update_is_the_paper_formula():
    theta = torch.randn(40)
    es = EvolutionStrategy({"w": theta}, population=4, sigma=0.01, learning_rate=0.5, fitness_shaping="raw", seed=3)
    members = es.ask().members()["w"]
    eps = (members - theta) / 0.01
    fitness = torch.tensor([1.0, -2.0, 0.5, 3.0])
    es.tell(fitness)
    expected = theta + 0.5 * (fitness[:, None] * eps).sum(0) / 4
    assert torch.allclose(es.params["w"], expected, atol=1e-5)
    assert es.generation == 1
    assert not es.ask().members()["w"].equal(members)  # fresh noise next generation


def test_low_rank_noise_has_unit_variance_and_the_update_is_the_formula():
    w = torch.randn(48, 32)
    es = EvolutionStrategy({"w": w}, population=6, sigma=0.01, learning_rate=0.5, fitness_shaping="raw", seed=2,
                           noise_rank=4)
    a, b = es.ask().noise(0)["w"]
    assert a.shape == (4, 32) and b.shape == (48, 4)
    eps = [(lambda f: f[1] @ f[0] / 2.0)(es.ask().noise(m)["w"]) for m in range(6)]  # B A / sqrt(r)
    assert torch.allclose(eps[0], -eps[1]) and torch.linalg.matrix_rank(eps[0]) == 4
    big = EvolutionStrategy({"w": torch.zeros(300, 200)}, population=2, sigma=1.0, learning_rate=1.0, noise_rank=8)
    a, b = big.ask().noise(0)["w"]
    assert abs((b @ a / 8**0.5).var().item() - 1) < 0.05  # every entry of E has variance 1, as dense noise
    fitness = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.5])
    es.tell(fitness)
    expected = w + 0.5 * sum(f * e for f, e in zip(fitness, eps)) / 6
    assert torch.allclose(es.params["w"], expected, atol=1e-5)
    assert torch.linalg.matrix_rank(es.params["w"] - w) > 4  # the update is high-rank


def test_es_and_adam_climb_a_quadratic_without_any_model():
    target = torch.linspace(-1, 1, 20)
    for optimizer, lr in (("es", 0.05), ("adam", 0.05)):
        es = EvolutionStrategy({"x": torch.zeros(20)}, population=20, sigma=0.1, learning_rate=lr,
                               fitness_shaping="centered_rank", optimizer=optimizer, seed=0)
        start = -(es.params["x"] - target).pow(2).sum().item()
        for _ in range(150):
            members = es.ask().members()["x"]
            es.tell(-(members - target).pow(2).sum(1))
        end = -(es.params["x"] - target).pow(2).sum().item()
        assert end > start * 0.1, f"{optimizer}: {start:.3f} -> {end:.3f}"


def test_weight_decay_shrinks_theta_when_fitness_is_flat():
    es = EvolutionStrategy({"x": torch.ones(10)}, population=4, sigma=0.1, learning_rate=0.1, weight_decay=0.5)
    es.ask()
    es.tell([1.0, 1.0, 1.0, 1.0])  # zero-score update: only the decay acts
    assert torch.allclose(es.params["x"], torch.full((10,), 0.95))


def test_state_dict_round_trip_continues_identically():
    a = EvolutionStrategy({"x": torch.randn(30)}, population=6, sigma=0.1, learning_rate=0.1, optimizer="adam", seed=5)
    for _ in range(3):
        a.tell(a.ask().members()["x"].sum(1))
    b = EvolutionStrategy({"x": torch.zeros(30)}, population=6, sigma=0.1, learning_rate=0.1, optimizer="adam", seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        a.tell(a.ask().members()["x"].sum(1))
        b.tell(b.ask().members()["x"].sum(1))
    assert a.params["x"].equal(b.params["x"]) and a.generation == b.generation == 5


def test_replaying_the_fitness_log_rebuilds_theta_bit_for_bit():
    start = {"w": torch.randn(24, 16), "v": torch.randn(16, 8)}
    for rank, optimizer in ((None, "adam"), (2, "es"), (2, "adam")):
        kwargs = dict(population=4, sigma=0.05, learning_rate=0.1, optimizer=optimizer, seed=9, noise_rank=rank)
        a = EvolutionStrategy(start, **kwargs)
        for g in range(4):
            a.tell(torch.randn(4, generator=torch.Generator().manual_seed(g)))
        b = EvolutionStrategy(start, **kwargs)
        b.load_state_dict(a.state_dict(with_params=False))  # the log alone
        assert b.generation == 4 and all(a.params[n].equal(b.params[n]) for n in start)
        a.tell([1.0, 0.0, 2.0, 3.0])
        b.tell([1.0, 0.0, 2.0, 3.0])
        assert all(a.params[n].equal(b.params[n]) for n in start)
