// glio-node's pathologist's view: a slide and glio-node's results (SEG regions, one heatmap) in
// dicom-microscopy-viewer, read from the DICOMweb server on this page's own origin.
//
// URL query (UIDs only, never patient data):
//   study=<StudyInstanceUID>  slide=<SeriesInstanceUID of the VL WSI>   (required)
//   seg=<SeriesInstanceUID of the SEG>  heatmap=<SeriesInstanceUID of one Parametric Map>
//   seg_opacity=0..1 (default 0.7)  heatmap_opacity=0..1 (default 0.5)
//
// When everything is added and no frame is loading any more, window.glioViewer.ready is true;
// every refusal or loading error of the viewer is in window.glioViewer.errors, in its own words,
// so a test fails with the viewer's message rather than a blank screen.
import * as DICOMwebClient from 'dicomweb-client'

const DMV = window.dicomMicroscopyViewer

// One colour per segment number (region class index + 1), distinct from each other and from
// H&E pink and purple. Index 0 is unused: segment numbers start at 1.
const SEGMENT_COLOURS = [
  null,
  [0, 114, 178], // 1
  [230, 159, 0], // 2
  [0, 158, 115], // 3
  [240, 228, 66], // 4
  [0, 0, 0], // 5
  [86, 180, 233], // 6
  [213, 94, 0], // 7
  [120, 120, 120], // 8
  [0, 255, 0], // 9
  [128, 64, 0], // 10
]

const state = {
  ready: false,
  segments: [], // {uid, number, label, colour}
  mappings: [], // {uid, label, description}
  errors: [], // the viewer's own messages
  framesLoading: 0,
  framesLoaded: 0,
  frameErrors: 0,
}
window.glioViewer = state

function report(error) {
  const message = error && error.message ? error.message : String(error)
  // The viewer passes a refusal to errorInterceptor and then throws it: keep it once.
  if (state.errors.includes(message)) return error
  state.errors.push(message)
  console.error('glio viewer:', message)
  return error
}

function opacity(params, name, fallback) {
  const value = params.get(name)
  if (value === null) return fallback
  const number = Number(value)
  if (!(number >= 0 && number <= 1)) throw new Error(`${name}=${value} must be a number from 0 to 1`)
  return number
}

// A palette for a BINARY segment: entry 0 (stored value 0) is the background, every other entry
// the segment's colour. setSegmentStyle windows stored values with centre 128 / width 256, which
// maps stored value 1 to entry 1 of a 256-entry table.
function binaryPalette(colour) {
  const data = [[0, 0, 0]]
  for (let i = 1; i < 256; i++) data.push(colour)
  return DMV.color.buildPaletteColorLookupTable({ data, firstValueMapped: 0, applyDisplayGammaCorrection: false })
}

function uidParam(params, name, required) {
  const value = params.get(name)
  if (value === null || value === '') {
    if (required) throw new Error(`the page needs ?${name}=<UID> in its address`)
    return null
  }
  if (!/^[0-9.]{1,64}$/.test(value)) throw new Error(`${name}=${value} is not a DICOM UID`)
  return value
}

function countFrames(container) {
  const { EVENTS } = DMV.events
  container.addEventListener(EVENTS.FRAME_LOADING_STARTED, () => { state.framesLoading += 1 })
  container.addEventListener(EVENTS.FRAME_LOADING_ENDED, () => {
    state.framesLoading -= 1
    state.framesLoaded += 1
  })
  container.addEventListener(EVENTS.FRAME_LOADING_ERROR, (event) => {
    state.frameErrors += 1
    const p = event.detail && event.detail.payload
    report(new Error(`frame ${p && p.frameNumber} of instance ${p && p.sopInstanceUID} did not load`))
  })
}

// VolumeImageViewer.render() attaches its map to the page only after an asynchronous step (it
// fetches the slide's ICC profiles first); a segment or mapping shown before that gets no tile
// loader and its tiles fail with "sourceLoader is not a function". The slide's first loaded
// frame proves the map is attached.
function firstFrame(container, seconds) {
  return new Promise((resolve, reject) => {
    const { EVENTS } = DMV.events
    const timer = setTimeout(() => reject(new Error(`the slide showed no frame within ${seconds} s`)), seconds * 1000)
    container.addEventListener(EVENTS.FRAME_LOADING_ENDED, () => { clearTimeout(timer); resolve() }, { once: true })
  })
}

function legend(element) {
  const lines = []
  for (const s of state.segments) {
    lines.push(`<p><span class="swatch" style="background: rgb(${s.colour.join(',')})"></span>${s.number} ${s.label}</p>`)
  }
  for (const m of state.mappings) lines.push(`<p>heatmap: ${m.description || m.label}</p>`)
  lines.push('<p><em>AI-generated, research use only.</em></p>')
  element.innerHTML = lines.join('')
}

async function main() {
  const params = new URLSearchParams(window.location.search)
  const studyInstanceUID = uidParam(params, 'study', true)
  const slideSeries = uidParam(params, 'slide', true)
  const segSeries = uidParam(params, 'seg', false)
  const heatmapSeries = uidParam(params, 'heatmap', false)
  const segOpacity = opacity(params, 'seg_opacity', 0.7)
  const heatmapOpacity = opacity(params, 'heatmap_opacity', 0.5)

  const client = new DICOMwebClient.api.DICOMwebClient({ url: `${window.location.origin}/dicom-web` })
  const series = (seriesInstanceUID) => client.retrieveSeriesMetadata({ studyInstanceUID, seriesInstanceUID })

  const images = (await series(slideSeries))
    .map((metadata) => new DMV.metadata.VLWholeSlideMicroscopyImage({ metadata }))
    .filter((image) => ['VOLUME', 'THUMBNAIL'].includes(image.ImageType[2]))
  if (images.length === 0) throw new Error(`series ${slideSeries} has no VOLUME image`)

  const container = document.getElementById('viewport')
  countFrames(container)
  const attached = firstFrame(container, 60)
  const viewer = new DMV.viewer.VolumeImageViewer({
    client,
    metadata: images,
    errorInterceptor: report,
    paletteDisplayGammaCorrection: false,
  })
  viewer.render({ container })
  state.viewer = viewer
  await attached

  // The heatmap first: layers draw in the order they are added, the regions on top.
  if (heatmapSeries) {
    const maps = (await series(heatmapSeries)).map((metadata) => new DMV.metadata.ParametricMap({ metadata }))
    viewer.addParameterMappings(maps)
    for (const mapping of viewer.getAllParameterMappings()) {
      viewer.showParameterMapping(mapping.uid)
      viewer.setParameterMappingStyle(mapping.uid, { opacity: heatmapOpacity })
      state.mappings.push({ uid: mapping.uid, label: mapping.label, description: mapping.description })
    }
  }
  if (segSeries) {
    const segs = (await series(segSeries)).map((metadata) => new DMV.metadata.Segmentation({ metadata }))
    viewer.addSegments(segs)
    for (const segment of viewer.getAllSegments()) {
      const colour = SEGMENT_COLOURS[segment.number] || [255, 255, 255]
      viewer.setSegmentStyle(segment.uid, { opacity: segOpacity, paletteColorLookupTable: binaryPalette(colour) })
      viewer.showSegment(segment.uid)
      state.segments.push({ uid: segment.uid, number: Number(segment.number), label: segment.label, colour })
    }
  }
  legend(document.getElementById('legend'))
}

// ready: added, and no frame has started loading for a second.
async function settle() {
  let seen = -1
  for (;;) {
    const now = state.framesLoaded + state.framesLoading * 1e6
    if (now === seen && state.framesLoading === 0) break
    seen = now
    await new Promise((resolve) => setTimeout(resolve, 1000))
  }
}

main()
  .then(settle)
  .catch(report)
  .finally(() => { state.ready = true })
