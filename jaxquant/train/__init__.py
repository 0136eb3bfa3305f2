"""Training steps built on optax: float and quantization-aware (QAT) next-token training, and
LoRA / QLoRA adapters on a frozen (NF4, double-quantized) base (:mod:`jaxquant.train.lora`)."""

from jaxquant.train.loop import LoopConfig as LoopConfig
from jaxquant.train.loop import LoopResult as LoopResult
from jaxquant.train.loop import WindowBatches as WindowBatches
from jaxquant.train.loop import has_checkpoint as has_checkpoint
from jaxquant.train.lora import LoRAConfig as LoRAConfig
from jaxquant.train.lora import LoRAState as LoRAState
from jaxquant.train.lora import init_lora as init_lora
from jaxquant.train.lora import init_lora_state as init_lora_state
from jaxquant.train.lora import load_adapters as load_adapters
from jaxquant.train.lora import make_lora_train_step as make_lora_train_step
from jaxquant.train.lora import merge_adapters as merge_adapters
from jaxquant.train.lora import save_adapters as save_adapters
from jaxquant.train.sharding import shard_train_step as shard_train_step
from jaxquant.train.step import TrainState as TrainState
from jaxquant.train.step import init_train_state as init_train_state
from jaxquant.train.step import make_eval_step as make_eval_step
from jaxquant.train.step import make_optimizer as make_optimizer
from jaxquant.train.step import make_schedule as make_schedule
from jaxquant.train.step import make_train_step as make_train_step
from jaxquant.train.step import next_token_loss as next_token_loss
