"""The ES strategy and its noise, with no language model anywhere."""

from __future__ import annotations

import torch

from evolm.es.noise import gaussian, stream_key
from evolm.es.strategy import EvolutionStrategy, shape_fitness


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
    es = EvolutionStrategy(torch.zeros(50), population=6, sigma=0.1, learning_rate=0.1, seed=1)
    members = es.ask()
    assert members.shape == (6, 50)
    assert torch.allclose(members[0], -members[1]) and torch.allclose(members[4], -members[5])
    assert not torch.allclose(members[0], members[2])


def test_fitness_shaping():
    f = torch.tensor([1.0, 3.0, 2.0, 2.0])
    z = shape_fitness(f, "zscore")
    assert abs(z.mean().item()) < 1e-9 and abs(z.std(unbiased=False).item() - 1) < 1e-6
    r = shape_fitness(f, "centered_rank")
    assert r.tolist() == [-0.5, 0.5, 0.0, 0.0]  # ties share their mean rank
    assert shape_fitness(f, "raw").tolist() == f.tolist()


def test_update_is_the_paper_formula():
    theta = torch.randn(40)
    es = EvolutionStrategy(theta, population=4, sigma=0.01, learning_rate=0.5, fitness_shaping="raw", seed=3)
    members = es.ask()
    eps = (members - theta) / 0.01
    fitness = torch.tensor([1.0, -2.0, 0.5, 3.0])
    es.tell(fitness)
    expected = theta + 0.5 * (fitness[:, None] * eps).sum(0) / 4
    assert torch.allclose(es.theta, expected, atol=1e-5)
    assert es.generation == 1
    assert not es.ask().equal(members)  # fresh noise next generation


def test_es_and_adam_climb_a_quadratic_without_any_model():
    target = torch.linspace(-1, 1, 20)
    for optimizer, lr in (("es", 0.05), ("adam", 0.05)):
        es = EvolutionStrategy(torch.zeros(20), population=20, sigma=0.1, learning_rate=lr,
                               fitness_shaping="centered_rank", optimizer=optimizer, seed=0)
        start = -(es.theta - target).pow(2).sum().item()
        for _ in range(150):
            members = es.ask()
            es.tell(-(members - target).pow(2).sum(1))
        end = -(es.theta - target).pow(2).sum().item()
        assert end > start * 0.1, f"{optimizer}: {start:.3f} -> {end:.3f}"


def test_weight_decay_shrinks_theta_when_fitness_is_flat():
    es = EvolutionStrategy(torch.ones(10), population=4, sigma=0.1, learning_rate=0.1, weight_decay=0.5)
    es.ask()
    es.tell([1.0, 1.0, 1.0, 1.0])  # zero-score update: only the decay acts
    assert torch.allclose(es.theta, torch.full((10,), 0.95))


def test_state_dict_round_trip_continues_identically():
    a = EvolutionStrategy(torch.randn(30), population=6, sigma=0.1, learning_rate=0.1, optimizer="adam", seed=5)
    for _ in range(3):
        a.tell(a.ask().sum(1))
    b = EvolutionStrategy(torch.zeros(30), population=6, sigma=0.1, learning_rate=0.1, optimizer="adam", seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        a.tell(a.ask().sum(1))
        b.tell(b.ask().sum(1))
    assert a.theta.equal(b.theta) and a.generation == b.generation == 5
