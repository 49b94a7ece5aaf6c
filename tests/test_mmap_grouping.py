"""MmAP (our METHODS.md 7.5 design) and gradient-driven task grouping."""
from __future__ import annotations

import pytest
import torch

from clipheads.training.backbone import BackboneError
from clipheads.training.grouping import (
    assign_groups,
    best_partition,
    choose_partition,
    collect_task_gradients,
    group_tasks,
    grouping_report,
    set_partitions,
    task_gradient_similarity,
)
from clipheads.training.methods import MethodError, TaskSpec, build_method

NAMES = ("cat", "dog", "red car")
CLIP_B16_PARAMS = 149_620_737


def _tasks(groups=(0, 0, 1, 1), names=NAMES) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(f"domain{i}", names, group=g) for i, g in enumerate(groups))


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- MmAP ----------------------------------------------------------------------------------
def test_mmap_trainable_share_on_vitb16(vitb16_backbone):
    head = build_method("mmap", vitb16_backbone, _tasks())
    n, j, d_s = head.config.n_ctx, head.depth, head.source_dim
    assert (n, j, d_s, head.n_groups) == (8, 11, 256, 2)
    instances = 2 + 4  # group-shared + task-specific
    assert head.num_trainable() == instances * (j * n * d_s + 512 // d_s + 768 // d_s) == 135_198
    share = 100 * head.num_trainable() / CLIP_B16_PARAMS
    assert 0.08 <= share <= 0.10, share


def test_prompts_are_kronecker_products_of_one_source(micro_backbone):
    torch.manual_seed(0)
    head = build_method("mmap", micro_backbone, _tasks())
    inst = head.group_prompts[1]
    with torch.no_grad():
        inst.text_factor.normal_()
        inst.vision_factor.normal_()
        s, a_t, a_v = inst.source, inst.text_factor, inst.vision_factor  # (J, n, d_s), (1, m_t), (1, m_v)
        for layer in range(head.depth):
            torch.testing.assert_close(inst.text()[layer], torch.kron(s[layer], a_t))
            torch.testing.assert_close(inst.vision()[layer], torch.kron(s[layer], a_v))
        assert inst.text().shape == (head.depth, 8, micro_backbone.text_width)
        assert inst.vision().shape == (head.depth, 8, micro_backbone.vision_width)


def test_concat_group_then_task_tokens(micro_backbone):
    head = build_method("mmap", micro_backbone, _tasks())
    with torch.no_grad():
        t0, v0 = head.task_prompts_for(0)
        t1, v1 = head.task_prompts_for(1)  # same group as task 0
        _, v2 = head.task_prompts_for(2)  # the other group
    n = head.config.n_ctx
    assert v0.shape == (head.depth, 2 * n, micro_backbone.vision_width)
    torch.testing.assert_close(v0[:, :n], v1[:, :n])  # the group-shared half
    torch.testing.assert_close(t0[:, :n], t1[:, :n])
    assert not torch.allclose(v0[:, n:], v1[:, n:])  # task-specific halves differ
    assert not torch.allclose(v0[:, :n], v2[:, :n])
    summed = build_method("mmap", micro_backbone, _tasks(), {"combine": "sum"})
    assert summed.task_prompts_for(0)[1].shape == (summed.depth, n, micro_backbone.vision_width)
    only_shared = build_method("mmap", micro_backbone, _tasks(), {"task_specific": False})
    assert len(only_shared.task_prompts) == 0 and only_shared.tokens_per_layer == n


def test_source_moves_both_towers_visual_factor_only_images(micro_backbone):
    torch.manual_seed(0)
    head = build_method("mmap", micro_backbone, _tasks())
    images = _images()

    def features():
        with torch.no_grad():
            return head.text_features(NAMES, 0).clone(), head.image_features(images, 0).clone()

    txt0, img0 = features()
    with torch.no_grad():
        head.group_prompts[0].source.add_(0.5 * torch.randn_like(head.group_prompts[0].source))
    txt1, img1 = features()
    assert float((txt1 - txt0).abs().max()) > 1e-4 and float((img1 - img0).abs().max()) > 1e-4
    with torch.no_grad():
        # a non-uniform change: a uniform rescale of a factor is invisible through the LayerNorms
        # that every visual prompt token meets (ln_pre, then each block's ln_1)
        head.group_prompts[0].vision_factor.add_(torch.randn_like(head.group_prompts[0].vision_factor))
    txt2, img2 = features()
    torch.testing.assert_close(txt2, txt1, atol=0, rtol=0)
    assert float((img2 - img1).abs().max()) > 1e-4
    with torch.no_grad():
        head.group_prompts[0].text_factor.add_(torch.randn_like(head.group_prompts[0].text_factor))
    txt3, img3 = features()
    torch.testing.assert_close(img3, img2, atol=0, rtol=0)
    assert float((txt3 - txt2).abs().max()) > 1e-4
    # another group's prompts do not touch task 0
    with torch.no_grad():
        head.group_prompts[1].source.add_(1.0)
    txt4, img4 = features()
    torch.testing.assert_close(img4, img3, atol=0, rtol=0)
    torch.testing.assert_close(txt4, txt3, atol=0, rtol=0)


def test_image_hooks_under_no_grad_are_constants(micro_backbone):
    head = build_method("mmap", micro_backbone, _tasks())
    with torch.no_grad():
        hooks = head.image_hooks(3)
    tensors = [hooks.shallow, *hooks.deep.values()]
    assert len(tensors) == head.depth and all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert head.foldable


def test_mmap_config_errors_and_resnet_refusal(micro_backbone, rn_backbone):
    with pytest.raises(MethodError, match="cover exactly"):
        build_method("mmap", micro_backbone, _tasks(groups=(0, 2, 2, 0)))
    with pytest.raises(MethodError, match="divide"):
        build_method("mmap", micro_backbone, _tasks(), {"source_dim": 10})
    with pytest.raises(MethodError, match="combine"):
        build_method("mmap", micro_backbone, _tasks(), {"combine": "product"})
    with pytest.raises(BackboneError, match="VisionTransformer"):
        build_method("mmap", rn_backbone, _tasks())


def test_sgd_steps_reduce_loss_on_two_tasks(micro_backbone):
    torch.manual_seed(0)
    tasks = (TaskSpec("a", ("cat", "dog"), group=0), TaskSpec("b", ("car", "tree", "boat"), group=0))
    head = build_method("mmap", micro_backbone, tasks)
    data = [(_images(8, seed=10), torch.tensor([0, 1] * 4)), (_images(9, seed=11), torch.tensor([0, 1, 2] * 3))]
    opt = torch.optim.SGD(head.configure_optimizer_groups(), lr=0.02, momentum=0.9)

    def total() -> torch.Tensor:
        return sum(head.training_loss(x, y, t)[0] for t, (x, y) in enumerate(data))

    with torch.no_grad():
        before = float(total())
    for _ in range(8):
        opt.zero_grad()
        total().backward()
        opt.step()
    with torch.no_grad():
        after = float(total())
    assert after < before - 0.03, (before, after)


# ---- grouping ------------------------------------------------------------------------------
def test_set_partitions_are_bell_numbers():
    assert [sum(1 for _ in set_partitions(n)) for n in range(1, 7)] == [1, 2, 5, 15, 52, 203]
    assert sorted(map(str, set_partitions(3))) == sorted(map(str, [
        [[0, 1, 2]], [[0, 1], [2]], [[0, 2], [1]], [[0], [1, 2]], [[0], [1], [2]]]))


def _planted_grads(pairs, dim=64, noise=0.3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(len(pairs), dim, generator=g)
    common = torch.randn(dim, generator=g)  # all tasks also share a component
    grads = {}
    for group, members in enumerate(pairs):
        for t in members:
            grads[f"task{t}"] = common + base[group] + noise * torch.randn(dim, generator=g)
    return dict(sorted(grads.items()))


@pytest.mark.parametrize("pairs", [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))])
def test_recovers_planted_pairs_from_synthetic_gradients(pairs):
    names, sim = task_gradient_similarity(_planted_grads(pairs))
    assert names == ["task0", "task1", "task2", "task3"]
    torch.testing.assert_close(sim, sim.t())
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(4))
    want = sorted(sorted(p) for p in pairs)
    assert best_partition(sim) == want  # number of groups chosen by separation
    assert best_partition(sim, n_groups=2) == want


def test_number_of_groups_rule_on_trivial_structures():
    assert best_partition(torch.ones(4, 4)) == [[0, 1, 2, 3]]  # all alike: one group
    assert best_partition(torch.eye(4)) == [[0], [1], [2], [3]]  # all orthogonal: alone
    assert best_partition(torch.ones(1, 1)) == [[0]]
    sim = torch.eye(3)
    sim[0, 1] = sim[1, 0] = 0.9
    assert best_partition(sim) == [[0, 1], [2]]  # singleton groups allowed
    assert best_partition(sim, n_groups=1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="n_groups"):
        best_partition(sim, n_groups=4)


def test_agglomerative_beyond_six_tasks():
    clusters = ((0, 3, 6), (1, 4), (2, 5, 7))
    grads = _planted_grads(clusters, noise=0.2, seed=1)
    report = grouping_report(grads)
    assert report.search.startswith("agglomerative")
    assert report.groups == [[0, 3, 6], [1, 4], [2, 5, 7]]
    assert choose_partition(report.similarity, n_groups=2)[0] != report.groups
    assert len(best_partition(report.similarity, n_groups=2)) == 2


def test_report_is_readable_and_assigns_groups(micro_backbone):
    report = grouping_report(_planted_grads(((0, 1), (2, 3))), steps=5)
    md = report.to_markdown()
    assert "| task | task0 | task1 | task2 | task3 |" in md
    assert "- group 0: task0, task1" in md and "- group 1: task2, task3" in md
    assert "exhaustive" in md and "5 warm-up steps" in md
    assert report.group_of == {"task0": 0, "task1": 0, "task2": 1, "task3": 1}
    assert report.to_dict()["groups"] == [["task0", "task1"], ["task2", "task3"]]
    tasks = assign_groups(_tasks(groups=(0, 0, 0, 0)), [[0, 3], [1, 2]])
    assert [t.group for t in tasks] == [0, 1, 1, 0]
    assert build_method("mmap", micro_backbone, tasks).n_groups == 2
    with pytest.raises(ValueError, match="partition"):
        assign_groups(tasks, [[0, 1]])


def _label_mapping_batches(seed: int) -> dict[int, list]:
    """4 tasks on the same 4 classes and image prototypes; tasks 0,1 label prototype c as c,
    tasks 2,3 as perm(c). Each task draws its own noisy images."""
    protos = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 1.5
    perm = torch.tensor([1, 0, 3, 2])
    out = {}
    for t, mapping in enumerate((torch.arange(4), torch.arange(4), perm, perm)):
        g = torch.Generator().manual_seed(100 * seed + t)
        y = torch.arange(4).repeat(4)
        out[t] = [(protos[y] + 0.5 * torch.randn(16, 3, 32, 32, generator=g), mapping[y]) for _ in range(2)]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_shared_label_mappings_from_real_gradients(micro_backbone, seed):
    tasks = tuple(TaskSpec(f"domain{i}", ("cat", "dog", "car", "tree")) for i in range(4))
    report = group_tasks(micro_backbone, tasks, _label_mapping_batches(seed), steps=3, seed=seed)
    assert report.groups == [[0, 1], [2, 3]], report.to_markdown()
    assert report.score.separation > 0.1


def test_collect_task_gradients_checks_its_parameter(micro_backbone):
    tasks = _tasks(groups=(0, 0, 0, 0))
    head = build_method("mmap", micro_backbone, tasks, {"task_specific": False})
    batches = {t.name: [(_images(3, seed=i), torch.tensor([0, 1, 2]))] for i, t in enumerate(tasks)}
    before = head.group_prompts[0].source.detach().clone()
    grads = collect_task_gradients(head, batches, steps=2)
    assert list(grads) == [t.name for t in tasks]
    assert all(g.shape == head.group_prompts[0].source.shape and float(g.abs().sum()) > 0 for g in grads.values())
    assert not torch.equal(before, head.group_prompts[0].source)  # the warm-up trained the prompt
    frozen = head.group_prompts[0].source.detach().clone()
    collect_task_gradients(head, batches, steps=1, update=False)
    assert torch.equal(frozen, head.group_prompts[0].source)
    with pytest.raises(ValueError, match="no parameter"):
        collect_task_gradients(head, batches, steps=1, param="ctx")
    with pytest.raises(ValueError, match="name the shared parameter"):
        collect_task_gradients(build_method("coop", micro_backbone, tasks, {"n_ctx": 2}), batches, steps=1)
    coop = build_method("coop", micro_backbone, tasks, {"n_ctx": 2})
    assert set(collect_task_gradients(coop, batches, steps=1, param="ctx")) == {t.name for t in tasks}


def test_mmap_head_round_trips_through_the_artifact(micro_backbone, tmp_path):
    from clipheads.training.artifact import load_head, save_head

    head = build_method("mmap", micro_backbone, _tasks(groups=(1, 0, 1, 0)), {"n_ctx": 2, "depth": 2})
    art = load_head(save_head(head, tmp_path / "mmap.head.safetensors"))
    assert [t.group for t in art.tasks] == [1, 0, 1, 0]
    loaded = art.build(micro_backbone)
    images = _images()
    with torch.no_grad():
        for task in range(4):
            torch.testing.assert_close(loaded.logits(images, task), head.logits(images, task), atol=0, rtol=0)


def _onnx_image_graph_matches(head, task: int, images: torch.Tensor) -> float:
    """Export `head`'s image graph for `task` under no_grad (as export does) and run it in ORT."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")

    class ImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head.image_features(x, task)

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own tracer/deprecation chatter
        want = head.image_features(images, task).numpy()
        torch.onnx.export(ImageGraph(), (images,), buf, input_names=["pixels"], output_names=["features"], dynamo=False)
    got = ort.InferenceSession(buf.getvalue()).run(None, {"pixels": images.numpy()})[0]
    return float(abs(got - want).max())


def test_mmap_image_graph_exports_to_onnx_per_task(micro_backbone):
    head = build_method("mmap", micro_backbone, _tasks())
    for task in (0, 3):
        assert _onnx_image_graph_matches(head, task, _images(2)) < 1e-5


def test_text_suffix_keeps_the_template_words_after_the_learned_tokens(micro_backbone):
    """`text_suffix`: "X .. X a photo of a {class}." - the slots stay right after SOT, the words stay
    frozen, and the class name still reaches the text features."""
    tasks = (TaskSpec("a", ("cat", "dog"), group=0),)
    plain = build_method("mmap", micro_backbone, tasks, {"n_ctx": 2})
    suffixed = build_method("mmap", micro_backbone, tasks, {"n_ctx": 2, "text_suffix": "a photo of a"})
    tok = micro_backbone.tokenize(["a photo of a cat."])[0]
    words = tok[1 : int(tok.argmax())]  # "a photo of a cat ." without SOT/EOT
    ph = suffixed.prompt_builder.placeholders(("cat",))
    n = suffixed.tokens_per_layer
    assert ph.slots[0].tolist() == list(range(1, 1 + n))
    assert ph.tokens[0, 1 + n : 1 + n + len(words)].tolist() == words.tolist()
    assert plain.prompt_builder.placeholders(("cat",)).tokens[0, 1 + n] != words[0]
    with torch.no_grad():
        f = suffixed.text_features(["cat", "dog"], 0)
    assert not torch.allclose(f[0], f[1])
