import copy

import pytest
import torch

from peft_minimal import adalora, count_parameters, load_adapter, save_adapter
from peft_minimal.train import TrainConfig, model_inputs, train

TARGETS = ["query", "key", "value", "dense"]


def config(**kw):
    base = dict(init_r=6, target_r=2, alpha=8.0, tinit=2, tfinal=3, delta_t=2, total_step=20,
                target_modules=TARGETS)
    return adalora.AdaLoRAConfig(**{**base, **kw})


def toy_batches(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 100, (8, 10), generator=g), torch.ones(8, 10, dtype=torch.long),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def peft_model_for(model, cfg, **kw):
    from peft import AdaLoraConfig, get_peft_model
    pcfg = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, tinit=cfg.tinit,
                         tfinal=cfg.tfinal, deltaT=cfg.delta_t, total_step=cfg.total_step,
                         beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                         target_modules=cfg.target_modules, **kw)
    return get_peft_model(model, pcfg)


def ours_name(peft_name):
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


def copy_from_peft(ours, theirs, grads=False):
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                params[ours_name(n)].copy_(p)
                if grads:
                    params[ours_name(n)].grad = None if p.grad is None else p.grad.clone()


def test_config_refuses_bad_schedules():
    with pytest.raises(ValueError, match="total_step"):
        adalora.AdaLoRAConfig()
    with pytest.raises(ValueError, match="no budgeting phase"):
        adalora.AdaLoRAConfig(total_step=100, tinit=60, tfinal=40)
    with pytest.raises(ValueError, match="target_r < init_r"):
        adalora.AdaLoRAConfig(total_step=100, init_r=8, target_r=8)
    with pytest.raises(ValueError, match="beta"):
        adalora.AdaLoRAConfig(total_step=100, beta1=1.0)


def test_identity_at_init_and_init_distribution(tiny_bert, tokens):
    before = tiny_bert(tokens).logits
    adalora.add_adalora(tiny_bert, config())
    assert torch.equal(tiny_bert(tokens).logits, before)  # Λ = 0
    layer = adalora.svd_layers(tiny_bert)["bert.encoder.layer.0.attention.self.query"]
    assert layer.lora_A.shape == (6, 32) and layer.lora_E.shape == (6, 1) and layer.lora_B.shape == (32, 6)
    assert layer.scaling == pytest.approx(8.0 / 6)
    torch.manual_seed(0)
    big = adalora.SVDLinear(torch.nn.Linear(400, 300), r=50, alpha=1.0)
    assert big.lora_A.std().item() == pytest.approx(0.02, rel=0.05)
    trainable, _ = count_parameters(tiny_bert)
    # r (in + out + 1) per layer: q, k, v, attention.output.dense in 2 layers, the pooler's dense
    # (matched by "dense" too), and the FFN's two matrices
    assert trainable == sum(6 * (i + o + 1) for i, o in [(32, 32)] * 9 + [(32, 64), (64, 32)] * 2)


def test_svdlinear_outputs_equal_peft(tiny_bert, tokens):
    cfg = config()
    theirs = peft_model_for(copy.deepcopy(tiny_bert), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    ours = adalora.add_adalora(copy.deepcopy(tiny_bert), cfg)
    copy_from_peft(ours, theirs)
    assert torch.allclose(ours(tokens).logits, theirs(tokens).logits, atol=1e-5)
    merged = ours(tokens).logits
    adalora.merge(ours)
    assert torch.allclose(ours(tokens).logits, merged, atol=1e-5)
    adalora.unmerge(ours)
    assert torch.allclose(ours.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                          tiny_bert.bert.encoder.layer[0].attention.self.query.weight, atol=1e-6)


def test_orthogonal_regularization_equals_peft_and_is_zero_for_orthonormal(tiny_bert):
    cfg = config(orth_reg_weight=0.5)
    theirs = peft_model_for(copy.deepcopy(tiny_bert), cfg)
    ours = adalora.add_adalora(copy.deepcopy(tiny_bert), cfg)
    copy_from_peft(ours, theirs)
    batch = model_inputs(toy_batches(1)[0], torch.device("cpu"))
    with torch.no_grad():
        plain = tiny_bert(**batch).loss
        # AdaLoraModel.forward adds the penalty; a PeftModel without task_type skips it (peft #432)
        assert torch.equal(theirs(**batch).loss, plain)
        peft_reg = (theirs.base_model(**batch).loss - plain) / 0.5
    assert adalora.orthogonal_regularization(ours).item() == pytest.approx(peft_reg.item(), rel=1e-4)
    with torch.no_grad():
        for layer in adalora.svd_layers(ours).values():
            q, _ = torch.linalg.qr(torch.randn(layer.lora_A.shape[1], layer.lora_A.shape[0]))
            layer.lora_A.copy_(q.T)
            p, _ = torch.linalg.qr(torch.randn(*layer.lora_B.shape))
            layer.lora_B.copy_(p)
    assert adalora.orthogonal_regularization(ours).item() < 1e-5


def peft_triplet_scores(allocator, name):
    ipt_e = allocator._element_score(f"{name}.lora_E.default")
    ipt_a = allocator._element_score(f"{name}.lora_A.default").mean(dim=1, keepdim=True)
    ipt_b = allocator._element_score(f"{name}.lora_B.default").mean(dim=0).view(-1, 1)
    return allocator._combine_ipt(ipt_e, torch.cat([ipt_a, ipt_b], dim=1))


def test_rank_allocator_matches_peft_over_a_training_run(tiny_bert):
    """Same weights and gradients in, at every step: same scores, budget and masks out."""
    cfg = config()
    theirs = peft_model_for(copy.deepcopy(tiny_bert), cfg)
    ours = adalora.add_adalora(copy.deepcopy(tiny_bert), cfg)
    allocator = adalora.RankAllocator(ours, cfg)
    their_alloc = theirs.base_model.rankallocator
    assert (allocator.init_budget, allocator.target_budget) == (their_alloc.init_bgt, their_alloc.target_bgt)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(toy_batches(cfg.total_step), start=1):
        theirs(**model_inputs(batch, torch.device("cpu"))).loss.backward()
        optimizer.step()
        copy_from_peft(ours, theirs, grads=True)
        budget = allocator.update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        assert budget == their_alloc.budget_schedule(step)[0]
        if step < cfg.total_step - cfg.tfinal:
            for name in allocator.layer_names:
                assert torch.allclose(allocator.triplet_scores()[name], peft_triplet_scores(their_alloc, name),
                                      rtol=1e-5, atol=1e-12)
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                assert torch.equal(dict(ours.named_parameters())[ours_name(n)], p), (step, n)
        optimizer.zero_grad()
    final_ranks = adalora.ranks(ours)
    assert sum(final_ranks.values()) == allocator.target_budget  # the final budget is the target
    assert len(set(final_ranks.values())) > 1                     # and it is spread unevenly
    their_pattern = theirs.peft_config["default"].rank_pattern
    assert {ours_name(k): v for k, v in their_pattern.items()} == ours.peft_config.rank_pattern


def test_budget_schedule_is_cubic_and_ends_at_target(tiny_bert):
    cfg = config(tinit=10, tfinal=10, delta_t=1, total_step=110)
    allocator = adalora.RankAllocator(adalora.add_adalora(tiny_bert, cfg), cfg)
    b0, bt = allocator.init_budget, allocator.target_budget
    budgets = [allocator.budget_schedule(t)[0] for t in range(111)]
    assert budgets[:11] == [b0] * 11 and budgets[100:] == [bt] * 11
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[55] == int((b0 - bt) * 0.5 ** 3 + bt)  # halfway through: 1/8 of the way back


def test_allocator_in_training_loop_skips_head_and_freezes_final_pattern(tiny_bert):
    cfg = config(total_step=16, tinit=2, tfinal=4, modules_to_save=["classifier"])
    adalora.add_adalora(tiny_bert, cfg)
    allocator = adalora.RankAllocator(tiny_bert, cfg)
    patterns = {}

    def after_step(model, step):
        allocator.update_and_allocate(model, step)
        patterns[step] = adalora.ranks(model)

    data = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*toy_batches(8))])
    train(tiny_bert, data, TrainConfig(steps=16, batch_size=8, lr=1e-2, progress=False),
          extra_loss=lambda m: cfg.orth_reg_weight * adalora.orthogonal_regularization(m),
          after_step=after_step, dev=torch.device("cpu"))
    assert all(patterns[t] == patterns[12] for t in range(12, 17))  # frozen after T - tfinal
    assert sum(patterns[16].values()) == allocator.target_budget
    assert not any("classifier" in n for n in allocator.exp_avg_ipt)


def test_allocator_skips_parameters_without_gradient(tiny_bert):
    cfg = config()
    adalora.add_adalora(tiny_bert, cfg)
    allocator = adalora.RankAllocator(tiny_bert, cfg)
    tiny_bert(**model_inputs(toy_batches(1)[0], torch.device("cpu"))).loss.backward()
    tiny_bert.bert.encoder.layer[0].attention.self.query.lora_A.grad = None
    allocator.update_scores(tiny_bert)
    assert "bert.encoder.layer.0.attention.self.query.lora_A" not in allocator.exp_avg_ipt
    assert "bert.encoder.layer.0.attention.self.key.lora_A" in allocator.exp_avg_ipt


def trained_pair(tiny_bert, steps=12):
    """An AdaLoRA model after a short run: pruned, uneven ranks, trained tensors."""
    cfg = config(total_step=steps, tinit=1, tfinal=2, modules_to_save=["classifier"])
    model = adalora.add_adalora(copy.deepcopy(tiny_bert), cfg)
    allocator = adalora.RankAllocator(model, cfg)
    data = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*toy_batches(4))])
    train(model, data, TrainConfig(steps=steps, batch_size=8, lr=2e-2, progress=False),
          after_step=allocator.update_and_allocate, dev=torch.device("cpu"))
    return model


def test_saved_adapter_keeps_survivors_and_loads_in_peft_and_back(tiny_bert, tokens, tmp_path):
    from peft import PeftModel
    model = trained_pair(tiny_bert)
    expected = model(tokens).logits
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, r in adalora.ranks(model).items():
        assert saved[f"base_model.model.{name}.lora_E"].shape == (r, 1)
    assert 0 in adalora.ranks(model).values() or len(set(adalora.ranks(model).values())) > 1
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    assert torch.allclose(theirs(tokens).logits, expected, atol=1e-5)
    again = load_adapter(copy.deepcopy(tiny_bert), tmp_path)
    assert adalora.ranks(again) == adalora.ranks(model)
    assert torch.allclose(again(tokens).logits, expected, atol=1e-6)
    theirs.save_pretrained(tmp_path / "from_peft")
    ours_from_peft = load_adapter(copy.deepcopy(tiny_bert), tmp_path / "from_peft")
    assert torch.allclose(ours_from_peft(tokens).logits, expected, atol=1e-5)


def test_rank_zero_layer_round_trips(tiny_bert, tokens, tmp_path):
    model = adalora.add_adalora(copy.deepcopy(tiny_bert), config())
    allocator = adalora.RankAllocator(model, model.peft_config)
    allocator.rank_pattern = {f"{n}.lora_E": [i == 0 and n.endswith("query") for i in range(6)]
                              for n in allocator.layer_names}
    with torch.no_grad():
        for layer in adalora.svd_layers(model).values():
            layer.lora_E.fill_(0.5)
    allocator.apply_rank_pattern(model)
    model.peft_config.rank_pattern = allocator.rank_pattern
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(tiny_bert), tmp_path)
    assert adalora.ranks(loaded)["bert.encoder.layer.0.attention.self.key"] == 0
    assert torch.allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-6)
