"""Reading data: COCO and mask folders, images, the manifest, datasets and augmentation, the decoded-image cache,
fingerprints: the layer every other one stands on."""
