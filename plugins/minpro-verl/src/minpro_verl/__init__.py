"""MinPRO and the exact prefix ratio as verl policy losses.

verl imports this package through its `verl.plugins` entry point on `import verl`, in the
driver and in every worker; from then on `actor_rollout_ref.actor.policy_loss.loss_mode`
may be `minpro` or `prefix`.
"""

from minpro_verl.losses import register

register()
