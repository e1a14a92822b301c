"""tasks: training problems for meta-training and evaluating learned optimizers.

A :class:`Task` is a set of pure functions (``init``, ``loss``, ``metrics``,
``sample_batch``) plus the muP role of every parameter; configs are frozen dataclasses
that :func:`build` turns into tasks; :func:`get_suite` names lists of them. Your own
task is :func:`from_functions`; :func:`from_factory` builds one from a
``"package.module:factory"`` string.
"""

from tasks.base import FunctionTaskConfig
from tasks.base import Task
from tasks.base import TaskFactoryError
from tasks.base import from_factory
from tasks.base import from_functions
from tasks.base import supervised_task
from tasks.cost import estimate_step_seconds
from tasks.data import DatasetNotPreparedError
from tasks.data import DigitsData
from tasks.data import GaussianMixtureData
from tasks.data import TeacherStudentData
from tasks.data import TFDSImageData
from tasks.family import TaskFamily
from tasks.models.conv import ConvConfig
from tasks.models.logistic import LogisticConfig
from tasks.models.mlp import MLPConfig
from tasks.models.quadratic import QuadraticConfig
from tasks.models.sp_autoencoder import SPAutoencoderConfig
from tasks.models.sp_convnet import SPConvNetConfig
from tasks.models.sp_recurrent import SPRecurrentConfig
from tasks.models.sp_regression import SPRegressionConfig
from tasks.models.sp_resmlp import SPResMLPConfig
from tasks.models.sp_transformer import SPTransformerLMConfig
from tasks.models.transformer import TransformerLMConfig
from tasks.models.user import UserModelConfig
from tasks.registry import build
from tasks.registry import config_from_json
from tasks.registry import config_to_json
from tasks.suites import SuiteEntry
from tasks.suites import get_family
from tasks.suites import get_suite
from tasks.suites import tfds_suite
from tasks.suites import widths_suite
from tasks.training import train

__all__ = [
    "ConvConfig",
    "DatasetNotPreparedError",
    "DigitsData",
    "FunctionTaskConfig",
    "GaussianMixtureData",
    "LogisticConfig",
    "MLPConfig",
    "QuadraticConfig",
    "SPAutoencoderConfig",
    "SPConvNetConfig",
    "SPRecurrentConfig",
    "SPRegressionConfig",
    "SPResMLPConfig",
    "SPTransformerLMConfig",
    "SuiteEntry",
    "TFDSImageData",
    "Task",
    "TaskFactoryError",
    "TaskFamily",
    "TeacherStudentData",
    "TransformerLMConfig",
    "UserModelConfig",
    "build",
    "config_from_json",
    "config_to_json",
    "estimate_step_seconds",
    "from_factory",
    "from_functions",
    "get_family",
    "get_suite",
    "supervised_task",
    "tfds_suite",
    "train",
    "widths_suite",
]
