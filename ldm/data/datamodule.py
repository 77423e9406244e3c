"""DataModuleFromConfig: a LightningDataModule whose datasets are built from `target:`/`params:` configs."""

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset."""

    def __init__(self, dataset: Any):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test/predict datasets from configs, served in batches of `batch_size`.

    `use_worker_init_fn` is accepted for the original configs; workers are seeded by Lightning's
    `seed_everything(..., workers=True)` instead.
    """

    def __init__(
        self,
        batch_size: int,
        train: dict | None = None,
        validation: dict | None = None,
        test: dict | None = None,
        predict: dict | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.dataset_configs = {
            split: config
            for split, config in (
                ("train", train),
                ("validation", validation),
                ("test", test),
                ("predict", predict),
            )
            if config is not None
        }
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.wrap = wrap
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader}
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, config in self.dataset_configs.items():
            dataset = instantiate_from_config(config)
            self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle.get(split, False),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation") if "validation" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test") if "test" in self.datasets else []

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
