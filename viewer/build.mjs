// Builds dist/: our page and its script (bundled with dicomweb-client by esbuild) next to
// dicom-microscopy-viewer's own UMD build, its decode worker and the worker's WebAssembly codecs.
// Serve dist/ from the DICOMweb server's origin (Orthanc's ServeFolders plugin) to avoid CORS.
import { build } from 'esbuild'
import { cpSync, mkdirSync, readdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'

const dist = 'dist'
const dmv = join('node_modules', 'dicom-microscopy-viewer', 'dist')

rmSync(dist, { recursive: true, force: true })
mkdirSync(dist)
await build({
  entryPoints: ['src/main.js'],
  bundle: true,
  format: 'iife',
  target: 'es2020',
  outfile: join(dist, 'main.js'),
  logLevel: 'warning',
})
cpSync(join('src', 'index.html'), join(dist, 'index.html'))
cpSync(join(dmv, 'dicomMicroscopyViewer.bundle.min.js'), join(dist, 'dicomMicroscopyViewer.bundle.min.js'))
// The UMD build starts its worker as ./dataLoader.worker.min.js, the dynamic-import build's
// worker: that one runs in a worker scope (the UMD worker bundle assigns to an undefined root
// there and throws), and it finds its WebAssembly codecs next to itself.
const worker = join(dmv, 'dynamic-import')
for (const name of readdirSync(worker)) {
  if (name.endsWith('.wasm') || name === 'dataLoader.worker.min.js') cpSync(join(worker, name), join(dist, name))
}
