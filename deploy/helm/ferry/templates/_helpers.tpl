{{/* Names, labels, images and the addresses the templates share. */}}

{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, plus the chart name unless it already contains it.
Truncated so that "<fullname>-<component>" (at most 10 more characters) stays a valid DNS label. */}}
{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ferry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object the chart creates: (dict "ctx" $ "component" "operator"). */}}
{{- define "ferry.labels" -}}
helm.sh/chart: {{ include "ferry.chart" .ctx }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end }}

{{/* The InferenceCluster's name; the operator names its workloads <name>-<component>. */}}
{{- define "ferry.clusterName" -}}
{{- default (include "ferry.fullname" .) .Values.cluster.name }}
{{- end }}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "ferry.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository:tag from an image block: (dict "image" .Values.image.worker "ctx" $). */}}
{{- define "ferry.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.registry }}
{{- printf "%s/%s:%s" .image.registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "ferry.redisEnabled" -}}
{{- if and .Values.redis.enabled (not .Values.redis.external.url) }}true{{ end }}
{{- end }}

{{- define "ferry.redisName" -}}
{{- printf "%s-redis" (include "ferry.fullname" .) }}
{{- end }}

{{/* The scheduler's Redis: cluster.scheduler.redisURL, else the external one, else the bundled one. */}}
{{- define "ferry.redisURL" -}}
{{- $scheduler := .Values.cluster.scheduler | default dict }}
{{- if $scheduler.redisURL }}
{{- $scheduler.redisURL }}
{{- else if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else if include "ferry.redisEnabled" . }}
{{- printf "redis://%s.%s.svc:6379/0" (include "ferry.redisName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "ferry.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Downward-API env every Ferry pod carries (docs/kubernetes.md). */}}
{{- define "ferry.downwardEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
{{- end }}

{{/* Prometheus label matchers of this release's cluster, as the monitors label the series. */}}
{{- define "ferry.promSelector" -}}
namespace="{{ .Release.Namespace }}",ferry_cluster="{{ include "ferry.clusterName" . }}"
{{- end }}

{{- define "ferry.hasMonitoring" -}}
{{- if or .Values.monitoring.assumeCRDs (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/* The Secret of the service token ("" when serviceAuth is off) and its key. */}}
{{- define "ferry.serviceTokenSecret" -}}
{{- if .Values.serviceAuth.enabled }}
{{- default (printf "%s-service-token" (include "ferry.fullname" .)) .Values.serviceAuth.existingSecret }}
{{- end }}
{{- end }}

{{- define "ferry.serviceTokenKey" -}}
{{- if .Values.serviceAuth.existingSecret }}{{ default "token" .Values.serviceAuth.secretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The Secret of mutual TLS between Ferry processes ("" when serviceTLS is off). */}}
{{- define "ferry.serviceTLSSecret" -}}
{{- if .Values.serviceTLS.enabled }}
{{- default (printf "%s-service-tls" (include "ferry.fullname" .)) .Values.serviceTLS.existingSecret }}
{{- end }}
{{- end }}
