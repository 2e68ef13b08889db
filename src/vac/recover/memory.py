"""Per-rank memory of ``vac distill`` from the configuration (``vac distill --dry-run``, README table).

The terms follow the code of :mod:`vac.recover.distill`: fp32 master weights of the student (sharded
over the ranks by FSDP2, else whole), its gradients and AdamW moments for the trainable parameters;
with FSDP2 the parameters of the layer being computed and the next one (prefetch) and of the root
(embeddings, final norm, head) all-gathered in the compute dtype; the teacher in the compute dtype
(sharded likewise, or none with a teacher cache); the activations a micro-batch keeps for the backward
(every layer's, or with ``--grad-checkpoint`` each layer's input plus one layer's during its recompute)
and the larger of the backward's working set and the teacher forward's widest transients; the loss
(:func:`vac.recover.loss.head_kd_loss`): the scored tokens' hidden states and their gradient, the
teacher's hidden states (or its cached top-k), the head's gradient in fp32 when the head trains, and one
chunk's logits and softmaxes in fp32 (the whole logits never exist). Saved activations per token and layer are taken as
``10·hidden + 4·intermediate`` values (the two norms' inputs and outputs, q/k/v and the rotated q/k,
the attention output, gate/up/activation/product of the MLP; what autograd's saved-tensor hooks count
on a Llama layer); attention is assumed memory-efficient (no seq² term), as
SDPA's flash and memory-efficient kernels on GPUs are. Estimates: allocator slack and the CUDA context
(≈ 0.5–1 GB) come on top. Terms: ``weights`` (student, fp32), ``gathered`` (FSDP2's unsharded layers
and root), ``grads``, ``adam``, ``teacher``, ``activations``, ``logits`` (and the loss), ``peak`` (their
sum, except that without gradient checkpointing or accumulation the gradients and the saved
activations are not both at their full size: the backward frees the one as it builds the other).
Checked against the measured peak in tests/test_distill.py.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class Net:
    """The sizes the plan reads from a model (``of``: from a transformers config and a vac rank map)."""

    layers: int
    hidden: int
    inter: int
    vocab: int
    params: int  # all parameters (a tied head counted once)
    layer_params: int  # one decoder layer
    outer_params: int  # embeddings, final norm, head
    linear_params: int  # the decoder layers' linears (dense or factors): what trains by default

    @classmethod
    def of(cls, config) -> "Net":
        """From a transformers config (a vac checkpoint's: its rank map included), by building the model
        with empty weights (accelerate's ``init_empty_weights``: nothing is allocated)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from ..models.families import arch_for

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # a tied head is the embedding: counted once
        arch = arch_for(model)
        layers = model.get_submodule(arch.layers)
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        linear = sum(p.numel() for layer in layers for name in arch.linears
                     for p in layer.get_submodule(name).parameters())
        params = sum(p.numel() for p in model.parameters())
        return cls(len(layers), config.hidden_size, config.intermediate_size, config.vocab_size, params,
                   max(per_layer), params - sum(per_layer), linear)


def distill_bytes(student: Net, teacher: Net | None, *, world: int, fsdp: bool, bf16: bool, grad_checkpoint: bool,
                  micro_batch: int, seq_len: int, loss_chunk: int, top_k: int, cached_teacher: bool,
                  train_norms: bool = False, train_embeddings: bool = False, grad_accum: int = 1) -> dict[str, int]:
    """Bytes per rank of each term and their sum (``peak``) for one training step."""
    shards = world if fsdp and world > 1 else 1
    cb = 2 if bf16 else FP32  # compute dtype of parameters, activations and logits
    trainable = student.linear_params + (2 * student.hidden * student.layers if train_norms else 0) \
        + (student.outer_params if train_embeddings else 0)
    gathered = (2 * student.layer_params + student.outer_params) * cb if shards > 1 else 0
    terms = {
        "weights": student.params * FP32 // shards,
        "gathered": gathered,
        "grads": trainable * FP32 // shards + (student.layer_params * cb if shards > 1 else 0),
        "adam": 2 * trainable * FP32 // shards,
        # the teacher is loaded in the compute dtype (it has no master weights to keep)
        "teacher": 0 if cached_teacher or teacher is None else
        teacher.params * cb // shards + ((2 * teacher.layer_params + teacher.outer_params) * cb if shards > 1 else 0),
    }
    tokens = micro_batch * seq_len
    per_layer = tokens * (10 * student.hidden + 4 * student.inter) * cb
    # the teacher forward runs after the student's (its widest transients: one MLP's gate/up/activation,
    # the residual and the norm's output), no gradients kept
    teacher_forward = 0 if cached_teacher or teacher is None else tokens * (2 * teacher.hidden + 3 * teacher.inter) * cb
    if grad_checkpoint:
        # each layer's input kept; the backward through one layer recomputes its activations (or, at the
        # end of the forward, the teacher's transients)
        terms["activations"] = student.layers * tokens * student.hidden * cb + max(per_layer, teacher_forward)
    else:
        # every layer's saved tensors, and at the start of the backward its working set (the gradient of
        # the widest activations) or, before it, the teacher's transients
        working = tokens * (2 * student.hidden + 2 * student.inter) * cb
        terms["activations"] = student.layers * per_layer + max(working, teacher_forward)
    chunk = min(loss_chunk, tokens)
    live = not cached_teacher and teacher is not None
    # the teacher's final hidden states and their scored rows, or the cached values (fp32) and ids (int64)
    # with their scored rows; one chunk: the student's logits and softmax (the gradient in place), with a
    # live teacher also its logits, log-softmax, probabilities, the student's log-softmax over the
    # vocabulary and the KL's temporaries; with a cache those are [chunk, k]
    teacher_side = 2 * tokens * teacher.hidden * cb if live else 2 * tokens * top_k * (FP32 + 8)
    working = (8 if live else 3) * chunk * student.vocab * FP32
    head_grad = 2 * student.vocab * student.hidden * FP32 if train_embeddings else 0  # fp32 sum and its copy
    terms["logits"] = 3 * tokens * student.hidden * cb + teacher_side + working + head_grad
    # the gradients of the trainable parameters fill up during the backward while it frees the saved
    # activations layer by layer: without checkpointing the peak is the larger of the start (all
    # activations) and the end (all gradients and one layer's activations); with checkpointing the
    # activations stay small and the last layer's recompute meets all the gradients; gradient
    # accumulation keeps the previous micro-batches' gradients through the whole step
    rest = sum(v for k, v in terms.items() if k not in ("grads", "activations"))
    if grad_checkpoint or grad_accum > 1:
        both = terms["grads"] + terms["activations"]
    else:
        both = max(terms["activations"], terms["grads"] + per_layer)
    terms["peak"] = rest + both
    return terms


def distill_plan(student_config, teacher_config, cfg, *, cached_teacher: bool,
                 worlds: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """:func:`distill_bytes` of a :class:`~vac.recover.distill.DistillConfig` on 1, 2, 4 and 8 ranks
    (FSDP2 over several when ``cfg.fsdp``; each rank's micro-batch: the global batch over ranks ×
    ``grad_accum``, at least one sequence)."""
    student = Net.of(student_config)
    teacher = None if cached_teacher or teacher_config is None else Net.of(teacher_config)
    rows = []
    for world in worlds:
        micro = max(1, -(-cfg.batch_size // (world * cfg.grad_accum)))
        terms = distill_bytes(student, teacher, world=world, fsdp=cfg.fsdp, bf16=cfg.bf16,
                              grad_checkpoint=cfg.grad_checkpoint, micro_batch=micro, seq_len=cfg.seq_len,
                              loss_chunk=cfg.loss_chunk, top_k=cfg.top_k, cached_teacher=cached_teacher,
                              train_norms=cfg.train_norms, train_embeddings=cfg.train_embeddings,
                              grad_accum=cfg.grad_accum)
        rows.append({"ranks": world, "micro_batch": micro, "bytes": terms})
    return rows
