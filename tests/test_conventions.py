"""``solver.conventions: scalebio | acl | v1``, each against its formula on tiny inputs, and fast checks of
solver wiring that earlier slipped past every test. Each test's docstring names the bug it catches; each was
checked by injecting that bug once.
"""

import copy
import math

import pytest
import torch

from conftest import LinearModel, SquaredLossObjective, tiny_run_config
from scalebio.config import ConfigError, SolverConfig, load_config, sampling_mode
from scalebio.data import BatchSampler
from scalebio.conventions import lr_shape, released_lr_shape, resolve
from scalebio.solver import CausalLMObjective, ScaleBiO
from scalebio.mixture import lambda_gradient

K, D = 3, 4


# -- schedules ------------------------------------------------------------------------------------------------
def test_warmup_scalebio_vs_released():
    """scalebio: ceil(r·N) warmup steps, factor (t+1)/W; acl/v1: int(r·N) steps, factor t/W (lr 0 at step 0).
    Catches the two conventions swapped or sharing one formula."""
    n, r = 100, 0.035  # r·N = 3.5: ceil 4, int 3

    def shape(conventions, t):  # the lr multiplier the convention's schedule gives (one outer iteration, τ = 1)
        return resolve(conventions).schedule(t, n, SolverConfig(warmup_ratio=r, conventions=conventions))[0]

    assert [lr_shape(t, n, r, "cosine") for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [shape("scalebio", t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [released_lr_shape(t, n, r, "cosine") for t in range(3)] == [0.0, 1 / 3, 2 / 3]
    assert [shape("acl", t) for t in range(3)] == [0.0, 1 / 3, 2 / 3]
    assert shape("acl", 3) == 1.0
    assert shape("v1", 50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 97)))


def test_outer_loop_conventions():
    """scalebio: α·τ^i and a cosine restarted per outer iteration; acl: α·τ^(i+1) and τ^(−i) × one cosine over
    all steps. Catches τ ignored (either convention) and the restart/one-cosine choice swapped."""
    ours = SolverConfig(alpha=10.0, tau=2.0, outer_iterations=3)
    theirs = SolverConfig(alpha=10.0, tau=2.0, outer_iterations=3, conventions="acl")
    steps = 10

    def outer_schedule(step, cfg):
        return resolve(cfg.conventions).schedule(step, steps, cfg)

    assert outer_schedule(0, ours) == (1.0, 10.0)
    assert outer_schedule(10, ours) == (1.0, 20.0)          # restarted cosine, α·τ
    assert outer_schedule(25, ours)[1] == 40.0
    shape, alpha = outer_schedule(10, theirs)
    assert alpha == 40.0                                               # α·τ^(i+1), i = 1
    assert shape == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 30)) / 2.0)


def test_schedule_step_applies_tau_and_eps():
    """The solver really uses the schedule: α doubles in outer iteration 1 (τ = 2); u's Adam eps is eps/α (u steps
    on α-scaled gradients) by default in every convention, and eps under ``u_adam: plain``. Catches τ ignored in
    the loop, the eps rule lost, and the u_adam field ignored."""
    for conventions, u_adam, alpha1 in (("scalebio", "auto", 20.0), ("acl", "auto", 40.0), ("v1", "auto", 40.0),
                                        ("scalebio", "plain", 20.0), ("acl", "plain", 40.0)):
        cfg = SolverConfig(alpha=10.0, tau=2.0, outer_iterations=2, conventions=conventions, u_adam=u_adam)
        solver = ScaleBiO(LinearModel(D), LinearModel(D), SquaredLossObjective(), K, cfg)
        assert solver.schedule_step(5, 5) == alpha1 and solver.alpha == alpha1
        expected_eps = cfg.eps if u_adam == "plain" else cfg.eps / alpha1
        assert solver.opt_u.param_groups[0]["eps"] == pytest.approx(expected_eps)
        assert solver.opt_w.param_groups[0]["eps"] == cfg.eps


def test_acl_u_is_adam_on_alpha_scaled_gradients_across_a_change_of_alpha():
    """acl: u steps as the released code's AdamW on the gradient of α·L2, with the configured eps, also across the
    change of α between two outer iterations (τ = 2): its moments then hold gradients taken under the old α. The
    reference is that Adam written out in plain torch. Catches u's moments left in the old α's units (eps/α alone
    imitates the released code only while α is constant)."""
    torch.manual_seed(0)
    u, w = LinearModel(D), LinearModel(D)
    with torch.no_grad():
        u.weight.normal_()
        w.weight.normal_()
    steps, outer = 4, 2
    cfg = SolverConfig(alpha=10.0, tau=2.0, outer_iterations=outer, schedule="constant", lr_u=1e-2, lr_w=1e-2,
                       lr_lambda=1e-1, weight_decay_u=0.01, conventions="acl")
    solver = ScaleBiO(u, w, SquaredLossObjective(), K, cfg)
    beta1, beta2 = cfg.betas
    ref = u.weight.detach().clone()
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    for step in range(steps * outer):
        train = [_batch(10 + step, [0, 1, 2, 0]), _batch(50 + step, [1, 2, 2])]
        val = [_batch(90 + step, [0, 1])]
        p = solver.weights()
        solver.schedule_step(step, steps)
        solver.step(train, val)
        # The released code in outer iteration i: α·τ^(i+1), lr·τ^(−i) (constant shape), AdamW on ∇u (α · L2).
        i = step // steps
        alpha, lr = cfg.alpha * cfg.tau ** (i + 1), cfg.lr_u * cfg.tau ** (-i)
        x = ref.clone().requires_grad_(True)
        ell = torch.cat([0.5 * (mb["x"] @ x - mb["y"]) ** 2 for mb in train])
        src = torch.cat([mb["source"] for mb in train])
        (g,) = torch.autograd.grad(alpha * sum(p[j] * ell[src == j].mean() for j in range(K)), x)
        t = step + 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        ref = ref * (1 - lr * cfg.weight_decay_u)
        ref = ref - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + cfg.eps)
        torch.testing.assert_close(solver.u.weight.detach(), ref, rtol=1e-10, atol=1e-13,
                                   msg=lambda m, step=step: f"step {step}: {m}")


def _tiny_llama(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=64, num_hidden_layers=4, hidden_size=16, intermediate_size=32,
                                  num_attention_heads=2, num_key_value_heads=1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64)


def _token_batch(seed, b=4, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "source": torch.arange(b) % 2}


def test_lisa_state_is_not_a_convention_keep_all_state_is_the_released_policy():
    """LISA's optimizer state is not part of ``acl``: a block re-activated after a freeze restarts its Adam moments
    (ours frees them: LISA's memory saving), where the released code's one AdamW over all parameters resumes them.
    ``lisa.keep_all_state: true`` is the released policy: u then equals, bit for bit at every step, one AdamW built
    once over all of u's parameters (frozen blocks get no gradient), written out here on the same blocks; it steps
    on ∇L2 with eps/α, which is the released code's Adam on α·∇L2 (the test above). By default u is the same until
    the first re-activation and departs there. Catches keep_all_state not reproducing the released code, and the
    default keeping a frozen block's moments."""
    from scalebio.lisa import U_STREAM, W_STREAM, Lisa, draw_blocks, find_blocks
    from scalebio.mixture import mixture_loss, source_counts

    steps = 8
    draws = [draw_blocks(4, 1, 0, U_STREAM, s)[0] for s in range(steps)]
    reactivated = next(j for j in range(2, steps) if draws[j] in draws[:j - 1] and draws[j - 1] != draws[j])
    for keep in (False, True):
        u, w, ref = _tiny_llama(), _tiny_llama(), _tiny_llama()
        cfg = SolverConfig(alpha=3.0, lr_u=1e-2, lr_w=1e-2, lr_lambda=1e-2, schedule="constant", conventions="acl")
        solver = ScaleBiO(u, w, CausalLMObjective(), 2, cfg, Lisa(u, 1, 1, 0, U_STREAM, keep_all_state=keep),
                          Lisa(w, 1, 1, 0, W_STREAM, keep_all_state=keep))
        alpha = cfg.alpha * cfg.tau
        released = torch.optim.AdamW(ref.parameters(), lr=cfg.lr_u, betas=cfg.betas, eps=cfg.eps / alpha,
                                     weight_decay=cfg.weight_decay_u)
        _, ref_blocks = find_blocks(ref)
        for step in range(steps):
            train, val = [_token_batch(step), _token_batch(100 + step)], [_token_batch(200 + step)]
            p = solver.weights()
            assert solver.schedule_step(step, steps) == alpha
            solver.update_lisa(step)
            assert solver.lisa_u.active == [draws[step]]
            # The released code: the active block (and everything outside the blocks) trainable, one AdamW.
            for i, block in enumerate(ref_blocks):
                block.requires_grad_(i == draws[step])
            counts = sum(source_counts(mb["source"], 2) for mb in train)
            for mb in train:
                mixture_loss(CausalLMObjective().per_example_loss(ref, mb), mb["source"], p, counts).backward()
            released.step()
            released.zero_grad(set_to_none=True)
            solver.step(train, val)
            same = all(torch.equal(a, b) for a, b in zip(u.parameters(), ref.parameters()))
            assert same == (keep or step < reactivated), (keep, step, reactivated)


# -- the v1 loss ----------------------------------------------------------------------------------------------
def _batch(seed, sources):
    g = torch.Generator().manual_seed(seed)
    source = torch.tensor(sources)
    x = torch.randn(len(source), D, generator=g, dtype=torch.float64)
    y = torch.randn(len(source), generator=g, dtype=torch.float64) + source.double()
    return {"x": x, "y": y, "source": source}


def _solver(conventions):
    torch.manual_seed(0)
    u, w = LinearModel(D), LinearModel(D)
    with torch.no_grad():
        u.weight.normal_()
        w.weight.normal_()
    cfg = SolverConfig(alpha=3.0, lr_u=1e-2, lr_w=1e-2, lr_lambda=1e-2, conventions=conventions)
    solver = ScaleBiO(u, w, SquaredLossObjective(), K, cfg)
    with torch.no_grad():
        solver.lam.copy_(torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
    return solver


def test_v1_lambda_gradient_uses_per_micro_batch_means():
    """v1: n_i counted per micro-batch and each micro-batch's term over G, so the λ gradient is
    α J · (1/G) Σ_m (ℓ^w_m − ℓ^u_m) with per-micro-batch source means. Under scalebio it is α J (ℓ^w − ℓ^u) with
    global-batch means. Uneven micro-batches tell the two apart. Catches v1 falling back to global counts."""
    train = [_batch(1, [0, 0, 0, 1]), _batch(2, [1, 2, 2, 2])]  # source 0 absent from the second micro-batch
    val = [_batch(3, [0, 1])]
    for conventions in ("scalebio", "v1"):
        solver = _solver(conventions)
        u0, w0 = copy.deepcopy(solver.u), copy.deepcopy(solver.w)
        p = torch.softmax(solver.lam.detach(), 0)
        solver.step(train, val)
        obj = SquaredLossObjective()

        def means(model, mbs):
            ell = torch.cat([obj.per_example_loss(model, mb).detach() for mb in mbs])
            src = torch.cat([mb["source"] for mb in mbs])
            return torch.stack([ell[src == i].mean() if (src == i).any() else ell.new_zeros(()) for i in range(K)])

        if conventions == "scalebio":
            d = means(w0, train) - means(u0, train)
        else:
            d = sum(means(w0, [mb]) - means(u0, [mb]) for mb in train) / len(train)
        expected = lambda_gradient(p, d, torch.zeros(K, dtype=torch.float64), torch.ones(K, dtype=bool), 3.0)
        assert torch.allclose(solver.lam.grad, expected, rtol=1e-10, atol=1e-14), conventions


def test_v1_per_example_loss_over_padded_length():
    """v1's per-example loss divides the summed response-token loss by the padded length (T − 1 positions);
    ours by the response-token count. Catches either normalisation applied under the other convention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_layer=1, n_embd=8, n_head=2, n_positions=16)).double().eval()
    ids = torch.randint(1, 30, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ce, m = CausalLMObjective().token_losses(model, batch)
    ours = CausalLMObjective().per_example_loss(model, batch)
    theirs = CausalLMObjective(per_example="padded").per_example_loss(model, batch)
    assert torch.allclose(ours, ce.sum(1) / m.sum(1))
    assert torch.allclose(theirs, ce.sum(1) / 8)


def test_v1_validation_is_mean_of_micro_batch_means():
    """v1: L1 is the mean of the validation micro-batches' means; scalebio: the token mean over all of V."""
    train = [_batch(1, [0, 1, 2, 1])]
    val = [_batch(3, [0, 1, 2]), _batch(4, [0])]  # sizes 3 and 1: the two means differ
    obj = SquaredLossObjective()
    for conventions in ("scalebio", "v1"):
        solver = _solver(conventions)
        w0 = copy.deepcopy(solver.w)
        stats = solver.step(train, val)
        losses = [obj.per_example_loss(w0, mb).detach() for mb in val]
        expected = torch.cat(losses).mean() if conventions == "scalebio" else sum(l.mean() for l in losses) / 2
        assert stats.val_loss == pytest.approx(float(expected), rel=1e-12), conventions


def test_w_pass_order():
    """acl / v1 run w's pass over B before V (dropout makes the order matter); scalebio pairs them in one pass."""
    solver = _solver("acl")
    solver.objective = CausalLMObjective()  # one that could fuse: the released order still keeps B before V
    passes = solver.conventions.w_passes(["v0", "v1"], ["b0"], solver._can_fuse_w())
    assert passes == [(None, "b0"), ("v0", None), ("v1", None)]
    ours = _solver("scalebio")
    ours.objective = CausalLMObjective()
    assert ours.conventions.w_passes(["v0", "v1"], ["b0"], ours._can_fuse_w()) == [("v0", "b0"), ("v1", None)]


# -- sampling -------------------------------------------------------------------------------------------------
def test_sampling_with_replacement():
    """``replacement`` (acl) draws uniformly from the pool with replacement: repeats within one epoch's worth of
    draws, every source at its pool share, deterministic in the seed, resumable."""
    sizes = [5, 15]
    a = BatchSampler(sizes, 10, "replacement", seed=3)
    draws = [a.next_batch() for _ in range(400)]
    flat = [pair for batch in draws for pair in batch]
    assert len(set(flat[:20])) < 20                     # with replacement: repeats inside 20 draws of 20 items
    share = sum(s == 0 for s, _ in flat) / len(flat)
    assert share == pytest.approx(0.25, abs=0.02)
    b = BatchSampler(sizes, 10, "replacement", seed=3)
    assert [b.next_batch() for _ in range(400)] == draws
    c = BatchSampler(sizes, 10, "replacement", seed=3)
    c.next_batch()
    d = BatchSampler(sizes, 10, "replacement", seed=99)
    d.load_state_dict(c.state_dict())
    assert d.next_batch() == draws[1]


def test_sampling_auto_follows_conventions(tmp_path):
    path = tiny_run_config(tmp_path)
    assert sampling_mode(load_config(path)) == "stratified"
    assert sampling_mode(load_config(path, ["solver.conventions=acl"])) == "replacement"
    assert sampling_mode(load_config(path, ["solver.conventions=v1"])) == "pooled"
    assert sampling_mode(load_config(path, ["solver.conventions=v1", "data.sampling=stratified"])) == "stratified"
    with pytest.raises(ConfigError, match="solver.conventions"):
        load_config(path, ["solver.conventions=authors"])


# -- wiring that slipped past the suite before ---------------------------------------------------------------
def test_lambda_weight_decay_is_applied():
    """With u = w the λ gradient is exactly 0, so one AdamW step only decays λ: λ ← λ (1 − lr·wd).
    Catches λ's weight decay ignored (the released code's 0.01 pulls λ toward uniform)."""
    torch.manual_seed(0)
    u = LinearModel(D)
    with torch.no_grad():
        u.weight.normal_()
    w = copy.deepcopy(u)
    cfg = SolverConfig(alpha=3.0, lr_u=1e-2, lr_w=1e-2, lr_lambda=0.1, weight_decay_lambda=0.5)
    solver = ScaleBiO(u, w, SquaredLossObjective(), K, cfg)
    lam0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    with torch.no_grad():
        solver.lam.copy_(lam0)
    solver.step([_batch(1, [0, 1, 2, 0])], [_batch(2, [0, 1])])
    assert torch.equal(solver.lam.grad, torch.zeros(K, dtype=torch.float64))
    assert torch.allclose(solver.lam.detach(), lam0 * (1 - 0.1 * 0.5), rtol=1e-12)


def test_lisa_trains_embeddings_and_draws_independently_for_u_and_w(tmp_path):
    """In a real run: the embeddings (and GPT-2's tied head) are always trained under LISA, and with
    lisa.shared off u and w draw their blocks independently. Catches LISA freezing the embeddings, and u and w
    given the same stream."""
    from scalebio.reweight import Reweighting

    cfg = load_config(tiny_run_config(tmp_path, lisa={"enabled": True, "gamma": 1, "interval": 1},
                                      model={"architecture": "gpt2",
                                             "config_overrides": {"n_layer": 4, "n_embd": 32, "n_head": 2,
                                                                  "n_positions": 128}}))
    job = Reweighting(cfg)
    solver = job.solver
    wte_u = solver.u.get_input_embeddings().weight
    before = wte_u.detach().clone()
    draws_u, draws_w = [], []
    for step in range(3):
        solver.schedule_step(step, job.steps_per_outer)
        solver.update_lisa(step)
        draws_u.append(list(solver.lisa_u.active))
        draws_w.append(list(solver.lisa_w.active))
        assert wte_u.requires_grad and solver.w.get_input_embeddings().weight.requires_grad
        train, val = job._draw()
        solver.step(train, val)
    assert not torch.equal(wte_u.detach(), before)
    for step in range(3, 12):
        solver.update_lisa(step)
        draws_u.append(list(solver.lisa_u.active))
        draws_w.append(list(solver.lisa_w.active))
    assert draws_u != draws_w


# -- the authors' prompt -----------------------------------------------------------------------------------------
def test_authors_prompt_and_kept_eos():
    """``data.prompt: authors`` (auto under acl / v1): the Alpaca preamble before the instruction blocks, the loss
    only on the output and its eos, and a truncated example still ending in eos. ``scalebio`` has no preamble
    and cuts the eos. Catches the preamble lost, the prompt labelled, and the eos dropped by truncation."""
    from scalebio.data import AUTHORS_PREAMBLE, tokenize_record
    from scalebio.models import gpt2_bpe_tokenizer

    tok = gpt2_bpe_tokenizer()
    rec = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour of the sky and the sea."}
    ids, labels, cut = tokenize_record(rec, "alpaca", tok, 512, prompt="authors")
    text = tok.decode(ids)
    assert text.startswith(AUTHORS_PREAMBLE[False] + "### Instruction:\nName a colour.\n\n### Response:\n") and not cut
    assert tok.decode([t for t, y in zip(ids, labels) if y != -100]) == rec["output"] + tok.eos_token
    ours, _, _ = tokenize_record(rec, "alpaca", tok, 512)
    assert tok.decode(ours).startswith("### Instruction:")
    short = len(ids) - 4
    ids_cut, labels_cut, cut = tokenize_record(rec, "alpaca", tok, short, prompt="authors")
    assert cut and len(ids_cut) == short and ids_cut[-1] == tok.eos_token_id and labels_cut[-1] == tok.eos_token_id
    ours_cut, _, cut = tokenize_record(rec, "alpaca", tok, len(ours) - 4)
    assert cut and ours_cut[-1] != tok.eos_token_id
    conv = {"items": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    ids, labels, _ = tokenize_record(conv, "conversations", tok, 64, prompt="authors")
    assert tok.decode(ids) == "###Human: Hi###Assistant: Hello." + tok.eos_token
    assert tok.decode([t for t, y in zip(ids, labels) if y != -100]) == "###Assistant: Hello." + tok.eos_token


def test_prompt_auto_follows_conventions(tmp_path):
    from scalebio.config import prompt_style

    path = tiny_run_config(tmp_path)
    assert prompt_style(load_config(path)) == "scalebio"
    assert prompt_style(load_config(path, ["solver.conventions=acl"])) == "authors"
    assert prompt_style(load_config(path, ["solver.conventions=v1", "data.prompt=scalebio"])) == "scalebio"
