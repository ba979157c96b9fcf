-- flower.dist on a GPU through NCCL with one rank (these machines have one GPU; two ranks cannot
-- share a device in NCCL): every collective on a CUDA tensor, and train.fit{distributed = true,
-- device = 'cuda'} (gradients and synchronised BatchNorm through NCCL) against the ordinary GPU run.
-- Without a CUDA device, or in a build without NCCL, it reports one skip line.
local flower = require 'flower'
local T = require 'flower.test'
local dist = flower.dist

if not (flower.cuda.available() and dist.has_nccl()) then
  print(('ok - dist on GPU (NCCL) # SKIP %s'):format(not dist.has_nccl() and 'this build has no NCCL (make CUDA=1)'
    or tostring(flower.cuda.unavailable_reason())))
  os.exit(0)
end

T.test('collectives on a CUDA tensor through NCCL (one rank)', function()
  local t = flower.tensor({ 1, 2, 3 }):cuda()
  dist.allreduce(t, 'sum'); T.eq(t:cpu():sum():item(), 6)
  dist.allreduce(t, 'mean'); T.eq(t:cpu():sum():item(), 6)
  dist.allreduce(t, 'max'); T.eq(t:cpu():max():item(), 3)
  dist.broadcast(t, 0); T.eq(t:cpu():sum():item(), 6)
  local g = dist.all_gather(flower.ones(2, 3):cuda())
  T.check(g:is_cuda()); T.eq(g:cpu():sum():item(), 6)
  local ok, err = pcall(dist.allreduce, flower.ones(2):bfloat16():cuda())
  T.check(not ok and err:find('convert with :float()', 1, true), err)
end)

T.test('train.fit on the GPU: distributed (NCCL, sync BatchNorm) = the ordinary GPU run', function()
  flower.cuda.allow_tf32(false)
  T.fit_distributed_and_plain(64, 1e-5, { device = 'cuda' })
end)

T.done()
