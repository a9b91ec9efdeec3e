"""The metric-learning losses against float64 references written as explicit loops over pairs and
triplets, against pytorch-metric-learning where it has the same loss, and on bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyssl
import pyssl.losses.metric as metric
from pyssl.losses import (
    ContrastiveLoss,
    LiftedStructureLoss,
    NCELoss,
    NPairLoss,
    SoftNearestNeighborsLoss,
    TripletLoss,
)
from tolerances import assert_close, leaf  # noqa: E402

# Hypothesis draws the sizes and a seed; the tensors come from torch with that seed.
property_test = settings(max_examples=20, deadline=None)
SEEDS = st.integers(0, 2**31 - 1)


def random_float64(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def random_rotation(gen, d):
    return torch.linalg.qr(random_float64(gen, d, d))[0]


# ---- float64 references: explicit loops over pairs and triplets -----------------------------


def _zero(x):
    """0 with a (zero) gradient path to ``x``, like a loss over an empty set."""
    return (x * 0).sum()


def ref_distances(x, *, squared=False, cosine=False):
    """Nested lists: d[i][j] between rows i and j, one scalar at a time."""
    n = x.shape[0]
    d = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if cosine:
                d[i][j] = 1 - torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())
            else:
                sq = ((x[i] - x[j]) ** 2).sum()
                d[i][j] = sq if squared else sq.sqrt()
    return d


def _prepare(x, normalize):
    x = x.double()
    return F.normalize(x, dim=1) if normalize else x


def ref_contrastive(x, y, pos_margin, neg_margin, distance, squared_hinge, reduction, normalize=True):
    cosine = distance == "cosine"
    d = ref_distances(_prepare(x, normalize or cosine), cosine=cosine)
    power = 2 if squared_hinge else 1
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            if y[i] == y[j]:
                pos.append(torch.clamp(d[i][j] - pos_margin, min=0) ** power)
            else:
                neg.append(torch.clamp(neg_margin - d[i][j], min=0) ** power)
    if reduction == "mean":
        terms = pos + neg
        return sum(terms) / len(terms) if terms else _zero(x)

    def mean_of_nonzero(terms):
        kept = [t for t in terms if t > 0]
        return sum(kept) / len(kept) if kept else _zero(x)

    return mean_of_nonzero(pos) + mean_of_nonzero(neg)


def ref_triplet(x, y, margin, mining, squared, reduction, normalize=True):
    d = ref_distances(_prepare(x, normalize), squared=squared)
    losses = []
    for a in range(len(y)):
        positives = [p for p in range(len(y)) if p != a and y[p] == y[a]]
        negatives = [n for n in range(len(y)) if y[n] != y[a]]
        if not positives or not negatives:
            continue
        if mining == "all":
            for p in positives:
                for n in negatives:
                    losses.append(torch.clamp(d[a][p] - d[a][n] + margin, min=0))
        else:
            hardest_positive = max((d[a][p] for p in positives), key=lambda t: t.item())
            hardest_negative = min((d[a][n] for n in negatives), key=lambda t: t.item())
            losses.append(torch.clamp(hardest_positive - hardest_negative + margin, min=0))
    if reduction == "mean_nonzero":
        losses = [t for t in losses if t > 0]
    return sum(losses) / len(losses) if losses else _zero(x)


def ref_lifted(x, y, neg_margin, pos_margin, normalize=True):
    """The paper's form: a sum over unordered positive pairs i < j, divided by 2 |P|."""
    d = ref_distances(_prepare(x, normalize))
    n = len(y)
    total, pairs = _zero(x), 0
    for i in range(n):
        for j in range(i + 1, n):
            if y[i] != y[j]:
                continue
            terms = [torch.exp(neg_margin - d[i][k]) for k in range(n) if y[k] != y[i]]
            terms += [torch.exp(neg_margin - d[j][k]) for k in range(n) if y[k] != y[j]]
            if not terms:
                continue
            j_ij = torch.log(sum(terms)) + d[i][j] - pos_margin
            total = total + torch.clamp(j_ij, min=0) ** 2
            pairs += 1
    return total / (2 * pairs) if pairs else total


def ref_soft_nearest_neighbors(x, y, temperature, normalize=False):
    d = ref_distances(_prepare(x, normalize), squared=True)
    n = len(y)
    rows = []
    for i in range(n):
        same = [torch.exp(-d[i][j] / temperature) for j in range(n) if j != i and y[j] == y[i]]
        if not same:
            continue
        everyone = [torch.exp(-d[i][k] / temperature) for k in range(n) if k != i]
        rows.append(-torch.log(sum(same) / sum(everyone)))
    return sum(rows) / len(rows) if rows else _zero(x)


def ref_npair(anchors, positives, l2_reg):
    a, p = anchors.double(), positives.double()
    n = a.shape[0]
    total = 0
    for i in range(n):
        numerator = torch.exp(torch.dot(a[i], p[i]))
        denominator = sum(torch.exp(torch.dot(a[i], p[j])) for j in range(n))
        total = total - torch.log(numerator / denominator)
    squared_norms = sum((a[i] ** 2).sum() + (p[i] ** 2).sum() for i in range(n))
    return total / n + l2_reg * squared_norms / (2 * n)


def ref_nce(features, bank, indices, noise_indices, temperature, normalizer=None):
    """As the InstDisc code: P = exp(v.f / tau) / Z, h = P / (P + m Pn), Z (unless given) estimated
    as n times the mean of exp(v.f / tau) over the batch's data and noise samples."""
    f = F.normalize(features.double(), dim=1)
    bank = bank.double()
    n_rows, m = bank.shape[0], noise_indices.shape[1]
    scores = [
        [torch.dot(bank[j], f[i]) / temperature for j in [int(indices[i])] + noise_indices[i].tolist()]
        for i in range(f.shape[0])
    ]
    if normalizer is None:
        normalizer = n_rows * sum(math.exp(s.item()) for row in scores for s in row) / sum(map(len, scores))
    noise_mass = m / n_rows
    total = 0
    for row in scores:
        p_data = torch.exp(row[0]) / normalizer
        total = total + torch.log(p_data / (p_data + noise_mass))
        for s in row[1:]:
            p_noise = torch.exp(s) / normalizer
            total = total + torch.log(noise_mass / (p_noise + noise_mass))
    return -total / len(scores), normalizer


def grads_of(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def labels_for(n, classes):
    return torch.randint(0, classes, (n,))


def check_loss_and_grad(loss, expected, inputs, dtype, scale=1.0):
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close(loss, expected, dtype, scale=scale)
    for got, want in zip(grads_of(loss, *inputs), grads_of(expected, *inputs)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close(got, want, dtype, scale=scale)


# ---- each loss against its reference ---------------------------------------------------------

CONTRASTIVE_OPTIONS = [
    dict(pos_margin=0.0, neg_margin=1.0, distance="euclidean", squared_hinge=True, reduction="mean_nonzero"),
    dict(pos_margin=0.3, neg_margin=1.2, distance="euclidean", squared_hinge=False, reduction="mean_nonzero"),
    dict(pos_margin=0.2, neg_margin=0.9, distance="cosine", squared_hinge=True, reduction="mean"),
    dict(pos_margin=0.0, neg_margin=0.8, distance="cosine", squared_hinge=False, reduction="mean_nonzero"),
    # margins inside the spread of the distances: some pairs of each kind cost nothing
    dict(pos_margin=1.1, neg_margin=1.5, distance="euclidean", squared_hinge=True, reduction="mean_nonzero"),
]


@pytest.mark.parametrize("options", CONTRASTIVE_OPTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_matches_reference(options, normalize):
    x, y = leaf((12, 5), torch.float64), labels_for(12, 3)
    loss = ContrastiveLoss(**options, normalize_embeddings=normalize)(x, y)
    expected = ref_contrastive(x, y, **options, normalize=normalize)
    check_loss_and_grad(loss, expected, (x,), torch.float64)


@pytest.mark.parametrize("mining", ["all", "batch_hard"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_triplet_matches_reference(mining, squared, reduction):
    x, y = leaf((12, 5), torch.float64), labels_for(12, 3)
    margin = 0.3
    loss = TripletLoss(margin, mining=mining, squared=squared, reduction=reduction)(x, y)
    expected = ref_triplet(x, y, margin, mining, squared, reduction)
    check_loss_and_grad(loss, expected, (x,), torch.float64)


def test_triplet_all_matches_per_anchor_reference_on_a_larger_batch():
    # 400 anchors, tens of thousands of triplets each: the prefix-sum counting must hold at scale.
    x, y = leaf((400, 16), torch.float64), labels_for(400, 7)
    margin = 0.1
    loss = TripletLoss(margin, normalize_embeddings=False)(x, y)
    total, count = 0, 0
    for a in range(400):
        dist = torch.linalg.vector_norm(x[a] - x, dim=1)
        positive = (y == y[a]) & (torch.arange(400) != a)
        violations = dist[positive][:, None] - dist[y != y[a]][None, :] + margin
        total = total + violations.clamp_min(0).sum()
        count += int((violations > 0).sum())
    check_loss_and_grad(loss, total / count, (x,), torch.float64)


@pytest.mark.parametrize("neg_margin,pos_margin", [(1.0, 0.0), (0.5, 0.2), (4.0, 0.0)])
@pytest.mark.parametrize("normalize", [True, False])
def test_lifted_structure_matches_reference(neg_margin, pos_margin, normalize):
    x, y = leaf((12, 5), torch.float64), labels_for(12, 3)
    loss = LiftedStructureLoss(neg_margin, pos_margin, normalize_embeddings=normalize)(x, y)
    check_loss_and_grad(loss, ref_lifted(x, y, neg_margin, pos_margin, normalize), (x,), torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_soft_nearest_neighbors_matches_reference(temperature, normalize):
    x, y = leaf((12, 5), torch.float64), labels_for(12, 4)
    loss = SoftNearestNeighborsLoss(temperature, normalize_embeddings=normalize)(x, y)
    check_loss_and_grad(loss, ref_soft_nearest_neighbors(x, y, temperature, normalize), (x,), torch.float64)


@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("l2_reg", [0.0, 0.002, 0.5])
def test_npair_matches_reference(n, l2_reg):
    anchors, positives = leaf((n, 6), torch.float64), leaf((n, 6), torch.float64)
    loss = NPairLoss(l2_reg)(anchors, positives)
    check_loss_and_grad(loss, ref_npair(anchors, positives, l2_reg), (anchors, positives), torch.float64)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_nce_matches_reference_and_estimates_the_normalizer_once(temperature):
    batch, dim, rows, num_noise = 6, 5, 40, 9
    features = leaf((batch, dim), torch.float64)
    bank = F.normalize(torch.randn(rows, dim, dtype=torch.float64), dim=1)
    indices = torch.randint(0, rows, (batch,))
    noise = torch.randint(0, rows, (batch, num_noise))
    loss_fn = NCELoss(temperature, num_noise)
    assert torch.isnan(loss_fn.log_normalizer)
    loss = loss_fn(features, bank, indices, noise)
    expected, normalizer = ref_nce(features, bank, indices, noise, temperature)
    check_loss_and_grad(loss, expected, (features,), torch.float64)
    assert loss_fn.log_normalizer.item() == pytest.approx(math.log(normalizer), rel=1e-12)
    # The second batch reuses the first batch's Z, as the paper's code does.
    other = leaf((batch, dim), torch.float64)
    expected_other, _ = ref_nce(other, bank, indices, noise, temperature, normalizer)
    check_loss_and_grad(loss_fn(other, bank, indices, noise), expected_other, (other,), torch.float64)


def test_nce_with_a_given_normalizer_and_from_scores():
    features, bank = leaf((4, 3), torch.float64), F.normalize(torch.randn(25, 3, dtype=torch.float64), dim=1)
    indices, noise = torch.randint(0, 25, (4,)), torch.randint(0, 25, (4, 5))
    loss_fn = NCELoss(0.2, 5, normalizer=123.0)

    def expected():
        return ref_nce(features, bank, indices, noise, 0.2, normalizer=123.0)[0]

    check_loss_and_grad(loss_fn(features, bank, indices, noise), expected(), (features,), torch.float64)
    unit = F.normalize(features, dim=1)
    from_scores = loss_fn.loss_from_scores(
        (unit * bank[indices]).sum(1), torch.einsum("bd,bmd->bm", unit, bank[noise]), 25
    )
    check_loss_and_grad(from_scores, expected(), (features,), torch.float64)
    assert loss_fn.log_normalizer.item() == pytest.approx(math.log(123.0))


def test_nce_draws_uniform_noise_when_none_is_given():
    features, bank = leaf((3, 4), torch.float64), F.normalize(torch.randn(50, 4, dtype=torch.float64), dim=1)
    indices = torch.randint(0, 50, (3,))
    loss_fn = NCELoss(0.1, 6, normalizer=50.0)
    state = torch.get_rng_state()
    drawn = loss_fn(features, bank, indices)
    torch.set_rng_state(state)
    explicit = loss_fn(features, bank, indices, torch.randint(0, 50, (3, 6)))
    torch.testing.assert_close(drawn, explicit, rtol=0, atol=0)


def test_nce_gathers_the_bank_in_chunks(monkeypatch):
    features = leaf((7, 5), torch.float64)
    bank = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
    indices, noise = torch.randint(0, 30, (7,)), torch.randint(0, 30, (7, 4))
    whole = NCELoss(0.3, 4, normalizer=30.0)(features, bank, indices, noise)
    monkeypatch.setattr(metric, "_GATHER_BUDGET", 1)  # one row per chunk
    chunked = NCELoss(0.3, 4, normalizer=30.0)(features, bank, indices, noise)
    check_loss_and_grad(chunked, whole, (features,), torch.float64)


def test_nce_normalizer_follows_the_state_dict():
    bank = F.normalize(torch.randn(20, 3), dim=1)
    trained = NCELoss(0.1, 4)
    trained(torch.randn(5, 3), bank, torch.randint(0, 20, (5,)))
    resumed = NCELoss(0.1, 4)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.log_normalizer.item() == trained.log_normalizer.item()
    assert math.isfinite(resumed.log_normalizer.item())


# ---- dtypes and numerical stability ---------------------------------------------------------

LABELLED_LOSSES = {
    "contrastive": (ContrastiveLoss(), lambda x, y: ref_contrastive(x, y, 0.0, 1.0, "euclidean", True, "mean_nonzero")),
    "triplet_all": (TripletLoss(0.2), lambda x, y: ref_triplet(x, y, 0.2, "all", False, "mean_nonzero")),
    "triplet_batch_hard": (
        TripletLoss(0.2, mining="batch_hard"),
        lambda x, y: ref_triplet(x, y, 0.2, "batch_hard", False, "mean_nonzero"),
    ),
    "lifted": (LiftedStructureLoss(), lambda x, y: ref_lifted(x, y, 1.0, 0.0)),
    "soft_nn": (SoftNearestNeighborsLoss(2.0), lambda x, y: ref_soft_nearest_neighbors(x, y, 2.0)),
}


@pytest.mark.parametrize("name", list(LABELLED_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_labelled_losses_in_lower_precision(name, dtype):
    # Small batches: few hinge terms sit within rounding of their kink.
    loss_fn, reference = LABELLED_LOSSES[name]
    x, y = leaf((10, 4), dtype), labels_for(10, 3)
    check_loss_and_grad(loss_fn(x, y), reference(x, y), (x,), dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_npair_and_nce_in_lower_precision(dtype):
    anchors, positives = leaf((8, 4), dtype), leaf((8, 4), dtype)
    check_loss_and_grad(
        NPairLoss(0.01)(anchors, positives), ref_npair(anchors, positives, 0.01), (anchors, positives), dtype, 4.0
    )
    features = leaf((5, 4), dtype)
    bank = F.normalize(torch.randn(30, 4), dim=1).to(dtype)
    indices, noise = torch.randint(0, 30, (5,)), torch.randint(0, 30, (5, 6))
    expected, _ = ref_nce(features, bank, indices, noise, 0.5, normalizer=30.0)
    check_loss_and_grad(
        NCELoss(0.5, 6, normalizer=30.0)(features, bank, indices, noise), expected, (features,), dtype, 4.0
    )


def test_soft_nearest_neighbors_at_tiny_temperature_is_finite_and_hits_its_limit():
    # exp(-d/T) underflows for every pair; the log-sum-exp form keeps the ratio. As T -> 0 the
    # row loss tends to (nearest same-class distance - nearest distance) / T.
    temperature = 1e-4
    x, y = leaf((16, 3), torch.float32), labels_for(16, 3)
    loss = SoftNearestNeighborsLoss(temperature)(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    d = torch.cdist(x.detach().double(), x.detach().double()).square().fill_diagonal_(float("inf"))
    same = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
    rows = same.any(1)
    nearest_same = d.masked_fill(~same, float("inf")).min(1).values
    limit = ((nearest_same - d.min(1).values) / temperature)[rows].mean()
    assert loss.item() == pytest.approx(limit.item(), rel=1e-3, abs=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_margins_and_low_temperatures_stay_finite(dtype):
    # exp(200) overflows even float32, exp(-d / 0.01) underflows it; the losses themselves stay
    # within float16's range.
    x, y = leaf((32, 8), dtype), labels_for(32, 4)
    for loss_fn in (
        LiftedStructureLoss(neg_margin=200.0),
        SoftNearestNeighborsLoss(0.01),
        ContrastiveLoss(neg_margin=50.0),
    ):
        loss = loss_fn(x, y)
        (grad,) = grads_of(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), type(loss_fn).__name__
    features = leaf((8, 8), dtype)
    bank = F.normalize(torch.randn(64, 8), dim=1).to(dtype)
    loss = NCELoss(0.01, 16)(features, bank, torch.randint(0, 64, (8,)))
    assert torch.isfinite(loss) and torch.isfinite(grads_of(loss, features)[0]).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_coincident_points_have_finite_gradients():
    # Equal embeddings of different classes are at distance 0: the sqrt there must not give NaN.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    for loss_fn in (
        ContrastiveLoss(squared_hinge=False, normalize_embeddings=False),
        TripletLoss(normalize_embeddings=False),
        LiftedStructureLoss(normalize_embeddings=False),
    ):
        with torch.autograd.detect_anomaly():
            (grad,) = grads_of(loss_fn(x, y), x)
        assert torch.isfinite(grad).all(), type(loss_fn).__name__


# ---- batches without pairs or triplets --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", list(LABELLED_LOSSES))
@pytest.mark.parametrize("labels", [[0], [3, 3, 3, 3], [0, 1, 2, 3]])
def test_batches_without_terms_give_their_reference(name, labels):
    # One class (no negatives) or all distinct labels (no positives): only the terms that exist
    # count, and a loss with none is 0 with a zero gradient.
    # Anomaly detection: no NaN may appear even in intermediate gradients that get masked out.
    loss_fn, reference = LABELLED_LOSSES[name]
    y = torch.tensor(labels)
    x = leaf((len(labels), 3), torch.float64)
    with torch.autograd.detect_anomaly():
        check_loss_and_grad(loss_fn(x, y), reference(x, y), (x,), torch.float64)


def test_triplet_without_violations_is_zero():
    # Two tight, far-apart clusters: every triplet satisfies the margin.
    x = torch.cat([torch.randn(5, 4) * 1e-3 + 10, torch.randn(5, 4) * 1e-3 - 10]).requires_grad_()
    y = torch.tensor([0] * 5 + [1] * 5)
    for mining in ("all", "batch_hard"):
        loss = TripletLoss(0.5, mining=mining, normalize_embeddings=False)(x, y)
        assert loss.item() == 0.0
        assert grads_of(loss, x)[0].abs().max().item() == 0.0


# ---- gradcheck --------------------------------------------------------------------------------

GRADCHECK_LOSSES = [
    ContrastiveLoss(),
    ContrastiveLoss(0.1, 0.7, distance="cosine", squared_hinge=False, reduction="mean"),
    TripletLoss(0.3),
    TripletLoss(0.3, mining="batch_hard", squared=True, reduction="mean"),
    LiftedStructureLoss(0.8, 0.1),
    SoftNearestNeighborsLoss(0.7),
]


@pytest.mark.parametrize("loss_fn", GRADCHECK_LOSSES, ids=repr)
def test_labelled_losses_gradcheck(loss_fn):
    x, y = leaf((7, 3), torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, y), (x,))


def test_npair_and_nce_gradcheck(monkeypatch):
    anchors, positives = leaf((4, 3), torch.float64), leaf((4, 3), torch.float64)
    assert torch.autograd.gradcheck(NPairLoss(0.1), (anchors, positives))
    monkeypatch.setattr(metric, "_GATHER_BUDGET", 4)
    features = leaf((5, 3), torch.float64)
    bank = F.normalize(torch.randn(12, 3, dtype=torch.float64), dim=1)
    indices, noise = torch.randint(0, 12, (5,)), torch.randint(0, 12, (5, 3))
    loss_fn = NCELoss(0.5, 3, normalizer=12.0)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, bank, indices, noise), (features,))


# ---- properties ---------------------------------------------------------------------------------

PROPERTY_LOSSES = [
    ContrastiveLoss(),
    ContrastiveLoss(0.1, 0.9, distance="cosine", reduction="mean"),
    TripletLoss(0.2),
    TripletLoss(0.2, mining="batch_hard"),
    LiftedStructureLoss(),
    SoftNearestNeighborsLoss(1.5, normalize_embeddings=True),
]


@property_test
@given(
    n=st.integers(1, 24),
    d=st.integers(1, 8),
    classes=st.integers(1, 6),
    scale=st.floats(0.01, 100.0),
    which=st.integers(0, len(PROPERTY_LOSSES) - 1),
    seed=SEEDS,
)
def test_labelled_losses_invariances(n, d, classes, scale, which, seed):
    # Reordering the batch, renaming the classes and (the embeddings being normalised)
    # rescaling them leave the loss unchanged; it is never negative.
    gen = torch.Generator().manual_seed(seed)
    loss_fn = PROPERTY_LOSSES[which]
    x = random_float64(gen, n, d)
    y = torch.randint(0, classes, (n,), generator=gen)
    loss = loss_fn(x, y)
    assert loss.item() >= 0
    perm = torch.randperm(n, generator=gen)
    renamed = torch.randperm(classes, generator=gen)[y] * 7 - 3
    for other in (loss_fn(x[perm], y[perm]), loss_fn(x, renamed), loss_fn(x * scale, y)):
        torch.testing.assert_close(other, loss, rtol=1e-9, atol=1e-12)


@property_test
@given(
    n=st.integers(2, 20),
    d=st.integers(1, 6),
    temperature=st.floats(0.1, 10.0),
    scale=st.floats(0.1, 10.0),
    seed=SEEDS,
)
def test_soft_nearest_neighbors_depends_on_distance_over_temperature(n, d, temperature, scale, seed):
    # Only d_ij / T matters: translating the batch changes nothing, scaling it by c is
    # undone by the temperature c^2 T.
    gen = torch.Generator().manual_seed(seed)
    x = random_float64(gen, n, d)
    y = torch.randint(0, 3, (n,), generator=gen)
    loss = SoftNearestNeighborsLoss(temperature)(x, y)
    shift = random_float64(gen, d)
    torch.testing.assert_close(SoftNearestNeighborsLoss(temperature)(x + shift, y), loss, rtol=1e-8, atol=1e-10)
    scaled = SoftNearestNeighborsLoss(temperature * scale**2)(x * scale, y)
    torch.testing.assert_close(scaled, loss, rtol=1e-8, atol=1e-10)


@property_test
@given(n=st.integers(1, 16), d=st.integers(1, 8), l2_reg=st.floats(0.0, 1.0), seed=SEEDS)
def test_npair_invariances(n, d, l2_reg, seed):
    # Reordering the pairs and rotating the embedding space leave the loss unchanged.
    gen = torch.Generator().manual_seed(seed)
    anchors = random_float64(gen, n, d)
    positives = random_float64(gen, n, d)
    loss_fn = NPairLoss(l2_reg)
    loss = loss_fn(anchors, positives)
    perm = torch.randperm(n, generator=gen)
    rotation = random_rotation(gen, d)
    for other in (loss_fn(anchors[perm], positives[perm]), loss_fn(anchors @ rotation, positives @ rotation)):
        torch.testing.assert_close(other, loss, rtol=1e-9, atol=1e-12)


@property_test
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    rows=st.integers(1, 40),
    num_noise=st.integers(1, 10),
    temperature=st.floats(0.05, 1.0),
    seed=SEEDS,
)
def test_nce_invariances(n, d, rows, num_noise, temperature, seed):
    # With Z fixed, reordering the batch (with its indices) and rotating features and bank alike
    # leave the loss unchanged; so does rescaling the features, which are normalised.
    gen = torch.Generator().manual_seed(seed)
    features = random_float64(gen, n, d)
    bank = F.normalize(random_float64(gen, rows, d), dim=1)
    indices = torch.randint(0, rows, (n,), generator=gen)
    noise = torch.randint(0, rows, (n, num_noise), generator=gen)
    loss_fn = NCELoss(temperature, num_noise, normalizer=float(rows))
    loss = loss_fn(features, bank, indices, noise)
    assert loss.item() >= 0
    perm = torch.randperm(n, generator=gen)
    rotation = random_rotation(gen, d)
    for other in (
        loss_fn(features[perm], bank, indices[perm], noise[perm]),
        loss_fn(features @ rotation, bank @ rotation, indices, noise),
        loss_fn(features * 3.5, bank, indices, noise),
    ):
        torch.testing.assert_close(other, loss, rtol=1e-9, atol=1e-12)


# ---- parity with pytorch-metric-learning 2.9.0 ------------------------------------------------


@pytest.fixture
def pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, regularizers

    return distances, losses, miners, regularizers


def check_parity(ours, theirs, inputs):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads_of(ours, *inputs), grads_of(theirs, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_contrastive_matches_pml(pml):
    distances, losses, _, _ = pml
    x, y = leaf((64, 16), torch.float64), labels_for(64, 6)
    check_parity(ContrastiveLoss(squared_hinge=False)(x, y), losses.ContrastiveLoss()(x, y), (x,))
    check_parity(
        ContrastiveLoss(0.4, 1.5, squared_hinge=False, normalize_embeddings=False)(x, y),
        losses.ContrastiveLoss(0.4, 1.5, distance=distances.LpDistance(normalize_embeddings=False))(x, y),
        (x,),
    )
    # pml's cosine margins are similarity thresholds: 1 - our distance margins.
    check_parity(
        ContrastiveLoss(0.2, 0.9, distance="cosine", squared_hinge=False)(x, y),
        losses.ContrastiveLoss(0.8, 0.1, distance=distances.CosineSimilarity())(x, y),
        (x,),
    )


def test_triplet_matches_pml(pml):
    distances, losses, miners, _ = pml
    x, y = leaf((64, 16), torch.float64), labels_for(64, 6)
    check_parity(TripletLoss()(x, y), losses.TripletMarginLoss()(x, y), (x,))
    check_parity(
        TripletLoss(0.3, squared=True)(x, y),
        losses.TripletMarginLoss(0.3, distance=distances.LpDistance(power=2))(x, y),
        (x,),
    )
    hardest = miners.BatchHardMiner()(x, y)
    check_parity(TripletLoss(0.3, mining="batch_hard")(x, y), losses.TripletMarginLoss(0.3)(x, y, hardest), (x,))


def test_lifted_structure_matches_pml(pml):
    distances, losses, _, _ = pml
    x, y = leaf((48, 16), torch.float64), labels_for(48, 6)
    check_parity(LiftedStructureLoss(1.0, 0.1)(x, y), losses.LiftedStructureLoss(1.0, 0.1)(x, y), (x,))
    check_parity(
        LiftedStructureLoss(2.0, normalize_embeddings=False)(x, y),
        losses.LiftedStructureLoss(2.0, distance=distances.LpDistance(normalize_embeddings=False))(x, y),
        (x,),
    )


def test_npair_matches_pml(pml):
    distances, losses, _, regularizers = pml
    anchors, positives = leaf((32, 16), torch.float64, scale=0.3), leaf((32, 16), torch.float64, scale=0.3)
    theirs = losses.NPairsLoss(
        distance=distances.DotProductSimilarity(normalize_embeddings=False),
        embedding_regularizer=regularizers.LpRegularizer(power=2),
        embedding_reg_weight=0.01,
    )
    labels = torch.arange(32).repeat(2)
    check_parity(
        NPairLoss(0.01)(anchors, positives), theirs(torch.cat([anchors, positives]), labels), (anchors, positives)
    )


def test_soft_nearest_neighbors_matches_pml_nca(pml):
    distances, losses, _, _ = pml
    x, y = leaf((64, 8), torch.float64), labels_for(64, 10)
    theirs = losses.NCALoss(softmax_scale=1 / 4.0, distance=distances.LpDistance(power=2, normalize_embeddings=False))
    check_parity(SoftNearestNeighborsLoss(4.0)(x, y), theirs(x, y), (x,))


# ---- NaN in, NaN out; nothing to compare gives a connected 0 ------------------------------------

POISON_LOSSES = {
    "contrastive": ContrastiveLoss(squared_hinge=False),
    "contrastive_unnormalised": ContrastiveLoss(normalize_embeddings=False),
    "contrastive_cosine": ContrastiveLoss(distance="cosine"),
    "triplet": TripletLoss(),
    "triplet_batch_hard": TripletLoss(mining="batch_hard"),
    "lifted_structure": LiftedStructureLoss(),
    "soft_nearest_neighbors": SoftNearestNeighborsLoss(),
}


def _poisoned(kind, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    if kind == "all_nan":
        x.fill_(float("nan"))
    elif kind == "one_nan_row":
        x[1] = float("nan")
    else:  # one infinite entry
        x[2, 0] = float("inf")
    return x.requires_grad_()


@pytest.mark.parametrize("kind", ["all_nan", "one_nan_row", "one_inf"])
@pytest.mark.parametrize("name", POISON_LOSSES)
def test_non_finite_embeddings_give_nan_loss_and_gradients(name, kind):
    # ContrastiveLoss hid all-NaN embeddings behind its non-zero filter (0.0), and one NaN row
    # behind it as well: no loss may return a clean number for a non-finite input.
    x = _poisoned(kind, (8, 5))
    loss = POISON_LOSSES[name](x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isnan(loss) and torch.isnan(grad).all()


@pytest.mark.parametrize("kind", ["all_nan", "one_nan_row", "one_inf"])
def test_non_finite_pairs_and_features_give_nan(kind):
    anchors, positives = _poisoned(kind, (6, 4)), leaf((6, 4), torch.float64)
    loss = NPairLoss()(anchors, positives)
    assert torch.isnan(loss) and all(torch.isnan(g).all() for g in grads_of(loss, anchors, positives))
    features = _poisoned(kind, (6, 4))
    loss = NCELoss(0.1, 3, normalizer=10.0)(features, torch.randn(20, 4, dtype=torch.float64), torch.arange(6))
    assert torch.isnan(loss) and torch.isnan(grads_of(loss, features)[0]).all()


def test_nce_non_finite_bank_row_drawn_gives_nan():
    features = (torch.rand(4, 3, dtype=torch.float64) + 0.1).requires_grad_()
    bank = torch.randn(10, 3, dtype=torch.float64)
    noise = torch.tensor([[5, 6], [6, 7], [7, 8], [8, 9]])
    loss_fn = NCELoss(0.1, 2, normalizer=10.0)
    bank[0] = float("nan")  # not drawn: the loss stays finite
    assert torch.isfinite(loss_fn(features, bank, torch.arange(1, 5), noise))
    # Drawn as noise: a score of -inf, whose noise term log(1 - h) = 0 would look clean.
    bank[9] = torch.tensor([-float("inf"), 0.0, 0.0])
    assert torch.isnan(loss_fn(features, bank, torch.arange(1, 5), noise))


def test_nan_rule_leaves_finite_losses_unchanged(pml):
    # The NaN guard adds an exact 0 for finite input: parity with pml (value and gradient) holds.
    _, losses, _, _ = pml
    x, y = leaf((16, 4), torch.float64), labels_for(16, 3)
    check_parity(ContrastiveLoss(squared_hinge=False)(x, y), losses.ContrastiveLoss()(x, y), (x,))


def _no_pair_batches():
    # (embeddings, labels): an empty batch, a single sample, one class (no negatives).
    return [
        (leaf((0, 5), torch.float64), torch.zeros(0, dtype=torch.long)),
        (leaf((1, 5), torch.float64), torch.zeros(1, dtype=torch.long)),
        (leaf((4, 5), torch.float64), torch.zeros(4, dtype=torch.long)),
    ]


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: TripletLoss(), lambda losses, distances: losses.TripletMarginLoss()),
        (lambda: LiftedStructureLoss(), lambda losses, distances: losses.LiftedStructureLoss()),
        (
            lambda: SoftNearestNeighborsLoss(),
            lambda losses, distances: losses.NCALoss(
                distance=distances.LpDistance(power=2, normalize_embeddings=False)
            ),
        ),
    ],
    ids=["triplet", "lifted_structure", "soft_nearest_neighbors"],
)
def test_no_valid_pair_gives_zero_connected_to_the_graph_as_pml(pml, ours, theirs):
    distances, losses, _, _ = pml
    for x, y in _no_pair_batches():
        loss, reference = ours()(x, y), theirs(losses, distances)(x, y)
        # pml's NCA takes the log of a softmax sum of 1 on one class: 0 within rounding.
        assert loss.item() == 0.0 and abs(reference.item()) < 1e-12 and loss.requires_grad and reference.requires_grad
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))


def test_contrastive_empty_batch_and_single_sample_as_pml(pml):
    _, losses, _, _ = pml
    for x, y in _no_pair_batches()[:2]:
        loss = ContrastiveLoss(squared_hinge=False)(x, y)
        assert loss.item() == losses.ContrastiveLoss()(x, y).item() == 0.0
        assert torch.equal(torch.autograd.grad(loss, x)[0], torch.zeros_like(x))


def test_npair_and_nce_empty_batch_give_connected_zero():
    anchors, positives = leaf((0, 4), torch.float64), leaf((0, 4), torch.float64)
    loss = NPairLoss()(anchors, positives)
    assert loss.item() == 0.0 and all(g.shape == (0, 4) for g in grads_of(loss, anchors, positives))
    loss_fn, features = NCELoss(0.1, 3), leaf((0, 4))
    loss = loss_fn(features, torch.randn(20, 4), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.isnan(loss_fn.log_normalizer)  # Z is estimated from the first non-empty batch


# ---- exports and bad input ----------------------------------------------------------------------


def test_exported_and_described():
    for name in (
        "ContrastiveLoss",
        "TripletLoss",
        "NPairLoss",
        "LiftedStructureLoss",
        "NCELoss",
        "SoftNearestNeighborsLoss",
    ):
        assert name in pyssl.losses.__all__ and getattr(pyssl.losses, name).__doc__
    assert "mining='batch_hard'" in repr(TripletLoss(mining="batch_hard"))


def _bank_call(**overrides):
    args = dict(features=torch.randn(4, 3), memory_bank=torch.randn(10, 3), indices=torch.arange(4))
    args.update(overrides)
    return lambda: NCELoss(0.1, 2)(**args)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: ContrastiveLoss(pos_margin=-0.1), ValueError, "pos_margin must be a finite number >= 0"),
        (lambda: ContrastiveLoss(0.5, 0.5), ValueError, "neg_margin must be > pos_margin"),
        (lambda: ContrastiveLoss(distance="manhattan"), ValueError, "distance must be 'euclidean' or 'cosine'"),
        (lambda: ContrastiveLoss(reduction="sum"), ValueError, "reduction"),
        (lambda: TripletLoss(margin=float("nan")), ValueError, "margin"),
        (lambda: TripletLoss(margin="0.1"), TypeError, "margin must be a real number"),
        (lambda: TripletLoss(mining="semihard"), ValueError, "mining"),
        (lambda: LiftedStructureLoss(neg_margin=float("inf")), ValueError, "neg_margin"),
        (lambda: SoftNearestNeighborsLoss(0.0), ValueError, "temperature"),
        (lambda: NPairLoss(-0.1), ValueError, "l2_reg"),
        (lambda: NCELoss(-1.0), ValueError, "temperature"),
        (lambda: NCELoss(0.1, 0), ValueError, "num_noise"),
        (lambda: NCELoss(0.1, 2.0), TypeError, "num_noise must be an int"),
        (lambda: NCELoss(0.1, normalizer=0.0), ValueError, "normalizer"),
        (lambda: TripletLoss()(torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError, "embeddings must be 2-D"),
        (
            lambda: ContrastiveLoss()(torch.ones(4, 3, dtype=torch.long), torch.zeros(4)),
            TypeError,
            "embeddings must be a floating",
        ),
        (lambda: ContrastiveLoss()(torch.randn(4, 3), torch.zeros(4)), TypeError, "labels must be an integer"),
        (lambda: LiftedStructureLoss()(torch.randn(4, 3), [0, 0, 1, 1]), TypeError, "labels must be a torch.Tensor"),
        (
            lambda: SoftNearestNeighborsLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)),
            ValueError,
            "labels must have shape",
        ),
        (
            lambda: TripletLoss()(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)),
            ValueError,
            "labels must have shape",
        ),
        (
            lambda: TripletLoss(check_inputs_finite=True)(
                torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            "embeddings contains NaN",
        ),
        (
            lambda: NPairLoss()(torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            "anchors and positives must have the same shape",
        ),
        (
            lambda: NPairLoss()(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int32)),
            TypeError,
            "positives must be a floating",
        ),
        (
            lambda: NPairLoss(check_inputs_finite=True)(
                torch.randn(2, 3), torch.tensor([[1.0, float("inf"), 0], [0, 0, 0]])
            ),
            ValueError,
            "positives contains NaN or inf",
        ),
        (_bank_call(memory_bank=torch.randn(10, 4)), ValueError, "memory_bank must have the feature dim"),
        (_bank_call(memory_bank=torch.randn(0, 3)), ValueError, "memory_bank is an empty batch"),
        (_bank_call(indices=torch.tensor([0, 1, 2, 10])), ValueError, "indices must index the memory bank"),
        (_bank_call(indices=torch.zeros(4)), TypeError, "indices must be an integer tensor"),
        (_bank_call(indices=torch.arange(3)), ValueError, "indices must have shape"),
        (_bank_call(noise_indices=torch.zeros(4, 3, dtype=torch.long)), ValueError, "noise_indices must have shape"),
        (_bank_call(noise_indices=torch.full((4, 2), -1)), ValueError, "noise_indices must index"),
        (_bank_call(features=torch.randn(4)), ValueError, "features must be 2-D"),
        (
            lambda: NCELoss(0.1).loss_from_scores(torch.randn(3), torch.randn(4, 5), 10),
            ValueError,
            "data_scores must be a tensor of shape",
        ),
        (lambda: NCELoss(0.1).loss_from_scores(torch.randn(4), torch.randn(4, 5), 0), ValueError, "num_data"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        TripletLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        NCELoss(0.1, 2)(torch.randn(4, 3), torch.randn(10, 3, device="meta"), torch.arange(4))
