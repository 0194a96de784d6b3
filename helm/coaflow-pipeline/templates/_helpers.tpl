{{- define "coaflow-pipeline.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: coaflow
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "coaflow-pipeline.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.uid }}
fsGroup: {{ .Values.uid }}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "coaflow-pipeline.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}

{{/* The install's values (helm/coaflow) share `global`; where it sets a value, it wins over
this chart's own. */}}

{{/* An image of the coaflow build: (dict "root" . "kind" "cpu"|"gpu") ->
<global.images.registry>/coaflow-<kind>:<global.images.tag>, else images.<kind>. */}}
{{- define "coaflow-pipeline.image" -}}
{{- $g := dig "images" dict (.root.Values.global | default dict) -}}
{{- if $g.registry -}}
{{- printf "%s/coaflow-%s:%s" (trimSuffix "/" $g.registry) .kind (toString ($g.tag | default .root.Chart.AppVersion)) -}}
{{- else -}}
{{- index .root.Values.images .kind -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-pipeline.pullPolicy" -}}
{{- dig "images" "pullPolicy" .Values.images.pullPolicy (.Values.global | default dict) -}}
{{- end -}}

{{- define "coaflow-pipeline.storageClass" -}}
{{- dig "storageClass" "" (.Values.global | default dict) | default .Values.cache.storageClass -}}
{{- end -}}

{{- define "coaflow-pipeline.trackingUri" -}}
{{- dig "trackingUri" "" (.Values.global | default dict) | default .Values.trackingUri | default (printf "http://coaflow-tracking.%s:5000" .Release.Namespace) -}}
{{- end -}}

{{/* GPU placement (nodeSelector, tolerations) of this chart's GPU pods. */}}
{{- define "coaflow-pipeline.gpuPlacement" -}}
{{- $gpu := dig "gpu" dict (.Values.global | default dict) -}}
{{- with (hasKey $gpu "nodeSelector" | ternary $gpu.nodeSelector .Values.gpu.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (hasKey $gpu "tolerations" | ternary $gpu.tolerations .Values.gpu.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The release must go where the install's values say the stage pods, TrainJobs and KFP runs
are (global.namespace): one namespace for every object. */}}
{{- define "coaflow-pipeline.checkNamespace" -}}
{{- with dig "namespace" "" (.Values.global | default dict) -}}
{{- if and $.Release.Namespace (ne . $.Release.Namespace) -}}
{{- fail (printf "global.namespace is %q but this release goes to namespace %q: install it with -n %s, or set global.namespace (the stage pods, TrainJobs and KFP runs use global.namespace)" . $.Release.Namespace .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The teacher's URL and model when the install names one (global.teacher.url) or deploys it
(teacher.enabled); empty otherwise. */}}
{{- define "coaflow-pipeline.teacherUrl" -}}
{{- $url := dig "teacher" "url" "" (.Values.global | default dict) -}}
{{- if and $url .Values.teacher.enabled -}}
{{- fail "global.teacher.url and coaflow-pipeline.teacher.enabled: name an endpoint or deploy the teacher, not both" -}}
{{- end -}}
{{- if .Values.teacher.enabled -}}
{{- printf "http://coaflow-teacher.%s:8000/v1" .Release.Namespace -}}
{{- else -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "coaflow-pipeline.teacherModel" -}}
{{- .Values.teacher.model | default (dig "teacher" "model" "" (.Values.global | default dict)) | default "Qwen/Qwen3-32B" -}}
{{- end -}}

{{/* The config overrides every run of this install starts from: what the charts made (the
model name serving serves, the serving Deployment, the teacher). The Python side derives the same
from the same file (coaflow.orchestrate.k8s.run_overrides); tests/test_cluster_install.py checks
they agree. A YAML list. */}}
{{- define "coaflow-pipeline.runOverrides" -}}
{{- $model := dig "modelName" "" (.Values.global | default dict) -}}
{{- if $model }}
- {{ printf "run.name=%s" (trimSuffix "-agent" $model) | toJson }}
- "deploy.target=kubernetes"
- {{ printf "deploy.kubernetes.namespace=%s" .Release.Namespace | toJson }}
- {{ printf "deploy.kubernetes.deployment=%s" (first .Values.rbac.deploy.deployments) | toJson }}
- {{ printf "deploy.kubernetes.service_url=http://%s.%s:8000/v1" (first .Values.rbac.deploy.deployments) .Release.Namespace | toJson }}
{{- end }}
{{- with include "coaflow-pipeline.teacherUrl" . }}
- {{ printf "synthesize.llm.base_url=%s" . | toJson }}
- {{ printf "synthesize.llm.model=%s" (include "coaflow-pipeline.teacherModel" $) | toJson }}
{{- end }}
{{- range (dig "run" "overrides" (list) (.Values.global | default dict)) }}
- {{ . | toJson }}
{{- end }}
{{- end -}}

{{/* The RWX check: (dict "class" <StorageClass or empty> "Values" .Values). A class whose
provisioner only makes ReadWriteOnce volumes fails the install, naming the fix. */}}
{{- define "coaflow-pipeline.checkStorageClass" -}}
{{- $p := dig "provisioner" "" .class -}}
{{- if and $p (has "ReadWriteMany" .Values.cache.accessModes) (has $p .Values.cache.rwoOnlyProvisioners) -}}
{{- fail (printf "StorageClass %q (provisioner %s) makes ReadWriteOnce volumes only, and %s must be ReadWriteMany (stage pods on CPU and GPU nodes and every TrainJob node mount it at once): set global.storageClass to an RWX class (EFS: efs.csi.aws.com, Filestore: filestore.csi.storage.gke.io, Azure Files: file.csi.azure.com, NFS, CephFS; docs/cluster.md, Storage)" (dig "metadata" "name" "" .class) $p .Values.cache.name) -}}
{{- end -}}
{{- end -}}
