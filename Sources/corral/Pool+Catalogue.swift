import ArgumentParser
import Foundation
import PoolController

/// Changes to the catalogue and to users' limits (nothing running is lost).
extension Corral.Pool.Users {
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a user's instance limit or lease length (instances they hold keep running).")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The user's name.") var name: String
        @Option(help: "The most instances they may hold.") var maxInstances: Int?
        @Option(help: "How long their new instances are leased for, in seconds.") var leaseSeconds: Int?
        @Flag(help: "Lease their new instances for the pool's leases.default_seconds.") var defaultLease = false

        func validate() throws {
            guard maxInstances != nil || leaseSeconds != nil || defaultLease else {
                throw ValidationError("Give --max-instances, --lease-seconds or --default-lease.")
            }
            if let maxInstances, !(0...1_000_000).contains(maxInstances) {
                throw ValidationError("--max-instances must be from 0 to 1000000 (it was \(maxInstances)).")
            }
            if let leaseSeconds, !(60...31_536_000).contains(leaseSeconds) {
                throw ValidationError("--lease-seconds must be from 60 to 31536000 (it was \(leaseSeconds)).")
            }
            if leaseSeconds != nil, defaultLease { throw ValidationError("Give --lease-seconds or --default-lease, not both.") }
        }

        func run() async throws {
            let lease: Int?? = defaultLease ? .some(nil) : leaseSeconds.map { .some($0) }
            let user = try await administer {
                try await store.openExisting().setUserLimits(name, maxInstances: maxInstances, leaseSeconds: lease)
            }
            print("user '\(name)': at most \(user.maxInstances) instances, leased for \(user.leaseSeconds.map { "\($0) s" } ?? "the pool's default")")
        }
    }
}

/// `--active` or `--inactive`.
enum Activity: EnumerableFlag {
    case active, inactive
}

extension Corral.Pool.Flavors {
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Activate or deactivate a flavor (an inactive one takes no new instances; running ones keep it).")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The flavor's name.") var name: String
        @Flag var activity: Activity

        func run() async throws {
            let flavor = try await administer { try await store.openExisting().setFlavor(name, active: activity == .active) }
            print("flavor '\(name)' \(flavor.active ? "active" : "inactive")")
        }
    }
}

extension Corral.Pool.Images {
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Activate or deactivate an image, or change its login user (running instances keep it).")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The image's name.") var name: String
        @Flag var activity: Activity?
        @Option(help: "The guest user cloud-init gives instances' SSH keys to.") var loginUser: String?
        @Flag(help: "Forget its login user.") var noLoginUser = false

        func validate() throws {
            guard activity != nil || loginUser != nil || noLoginUser else {
                throw ValidationError("Give --active, --inactive, --login-user or --no-login-user.")
            }
            if let loginUser { try validateLoginUser(loginUser) }
            if loginUser != nil, noLoginUser { throw ValidationError("Give --login-user or --no-login-user, not both.") }
        }

        func run() async throws {
            let user: String?? = noLoginUser ? .some(nil) : loginUser.map { .some($0) }
            let image = try await administer {
                try await store.openExisting().setImage(name, active: activity.map { $0 == .active }, loginUser: user)
            }
            print("image '\(name)' \(image.active ? "active" : "inactive"), login user \(image.loginUser ?? "none")")
        }
    }
}

extension Corral.Pool.Wisps {
    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a wisp no template and no live instance boots from.")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The wisp's name.") var name: String

        func run() async throws {
            try await administer { try await store.openExisting().removeWisp(name) }
            print("wisp '\(name)' removed")
        }
    }
}

extension Corral.Pool.Wisps {
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change what a wisp boots; instances made keep theirs, warm ones of its templates are replaced.")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The wisp's name.") var name: String
        @Option(help: "A catalogue image to boot (replaces a dynamic image URL).") var image: String?
        @Option(help: "Or: an image URL the appliance downloads itself.") var dynamicImageURL: String?
        @Option(help: "A file of SSH public keys, one per line (repeatable); they replace the wisp's keys.") var sshKeyFile: [String] = []
        @Flag(help: "Remove the wisp's SSH keys.") var noSSHKeys = false
        @Option(help: "A post-creation script (#!...) or cloud-config (#cloud-config) file.") var postCreateFile: String?
        @Flag(help: "Remove the post-creation script.") var noPostCreate = false
        @Option(help: "A URL the appliance asks for its start parameters instead.") var callbackURL: String?
        @Flag(help: "Remove the callback URL.") var noCallbackURL = false

        func validate() throws {
            guard image == nil || dynamicImageURL == nil else { throw ValidationError("Give --image or --dynamic-image-url, not both.") }
            guard sshKeyFile.isEmpty || !noSSHKeys, postCreateFile == nil || !noPostCreate, callbackURL == nil || !noCallbackURL else {
                throw ValidationError("An option and its --no- form cannot go together.")
            }
            if let dynamicImageURL { try validateHTTPURL(dynamicImageURL, option: "--dynamic-image-url") }
            if let callbackURL { try validateHTTPURL(callbackURL, option: "--callback-url") }
        }

        func run() async throws {
            var change = WispChange(image: image, dynamicImageURL: dynamicImageURL)
            if !sshKeyFile.isEmpty { change.sshKeys = sshKeyFile.flatMap(readKeyLines) }
            if noSSHKeys { change.sshKeys = [] }
            if let postCreateFile { change.postCreate = readText(postCreateFile, option: "--post-create-file") }
            if noPostCreate { change.postCreate = "" }
            if let callbackURL { change.callbackURL = .some(callbackURL) }
            if noCallbackURL { change.callbackURL = .some(nil) }
            guard !change.isEmpty else { throw ValidationError("Give at least one change (see --help).") }
            let (wisp, retired) = try await administer { try await store.openExisting().setWisp(name, change, at: Date()) }
            print(
                "wisp '\(name)': \(wisp.image.map { "image \($0)" } ?? "image URL \(wisp.dynamicImageURL ?? "-")"), \(wisp.sshKeys.count) SSH keys, "
                    + "\(wisp.postCreate.isEmpty ? "no" : "a") post-create, \(wisp.callbackURL == nil ? "no" : "a") callback; "
                    + "\(retired.count) warm instances being replaced")
        }
    }
}

extension Corral.Pool.Templates {
    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a template's wisp, flavor or warm instances; warm ones of the old kind are replaced.")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The template's name.") var name: String
        @Option(help: "The wisp its instances boot from.") var wisp: String?
        @Option(help: "The flavor its instances run with.") var flavor: String?
        @Option(help: "How many booted instances to keep warm for it.") var hotStarts: Int?

        func validate() throws {
            guard wisp != nil || flavor != nil || hotStarts != nil else {
                throw ValidationError("Give --wisp, --flavor or --hot-starts.")
            }
            if let hotStarts, !(0...Template.maxHotStarts).contains(hotStarts) {
                throw ValidationError("--hot-starts must be from 0 to \(Template.maxHotStarts) (it was \(hotStarts)).")
            }
        }

        func run() async throws {
            let template = try await administer {
                try await store.openExisting().setTemplate(name, wisp: wisp, flavor: flavor, hotStarts: hotStarts, at: Date())
            }
            print("template '\(name)': wisp \(template.wisp), flavor \(template.flavor), \(template.hotStarts) hot starts")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove a template; its warm instances are decommissioned, those handed out keep running.")
        @OptionGroup var store: PoolDatabaseOptions
        @Argument(help: "The template's name.") var name: String

        func run() async throws {
            let retired = try await administer { try await store.openExisting().removeTemplate(name, at: Date()) }
            print("template '\(name)' removed; \(retired.count) warm instances being decommissioned")
        }
    }
}
