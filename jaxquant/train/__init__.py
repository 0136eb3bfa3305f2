"""Training steps built on optax: float and quantization-aware (QAT) next-token training, and
LoRA / QLoRA adapters on a frozen (NF4, double-quantized) base (:mod:`jaxquant.train.lora`)."""

from jaxquant.train.step import TrainState as TrainState
from jaxquant.train.step import init_train_state as init_train_state
from jaxquant.train.step import make_eval_step as make_eval_step
from jaxquant.train.step import make_optimizer as make_optimizer
from jaxquant.train.step import make_schedule as make_schedule
from jaxquant.train.step import make_train_step as make_train_step
from jaxquant.train.step import next_token_loss as next_token_loss
