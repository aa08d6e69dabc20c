"""Running a trained MaVEn on text and raw images: the processor (training's templates, image transform and
discrete tokenizer, loaded from the model directory), the generator and the ``maven chat`` command.

    from maven_dist.inference import MavenGenerator
    generator = MavenGenerator.from_pretrained("runs/tiny/stage4/export")
    print(generator.generate(["<image>\\nWhat colour is the circle?"], images=[["a.png"]])[0].text)
"""

from maven_dist.inference.generator import Generation, MavenGenerator
from maven_dist.inference.processor import InputError, MavenProcessor

__all__ = ["Generation", "InputError", "MavenGenerator", "MavenProcessor"]
